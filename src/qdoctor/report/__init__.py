"""Reports of a scan: versioned JSON, a Markdown summary, a self-contained HTML page with plots."""

from qdoctor.report.html import render_html, write_html
from qdoctor.report.json import read_json, report_to_json, write_json
from qdoctor.report.markdown import render_markdown

__all__ = ["render_markdown", "render_html", "write_html", "write_json", "read_json", "report_to_json"]
