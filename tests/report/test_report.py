"""Scan reports: JSON round trip and schema, Markdown summary, self-contained HTML with plots, CLI."""

import base64
import json
import re

import pytest
import torch

from helpers import tiny_model, tiny_tokenizer
from qdoctor.calib.collect import CalibrationConfig, calibration_windows
from qdoctor.cli import main
from qdoctor.errors import QDoctorError
from qdoctor.report import read_json, render_html, render_markdown, write_html, write_json
from qdoctor.report.json import report_to_json
from qdoctor.scan import SCHEMA, ScanConfig, ScanReport, scan
from qdoctor.testing import plant_weight_outliers

CAL = CalibrationConfig(n_samples=4, seqlen=48)


@pytest.fixture(scope="module")
def report():
    """A tiny llama with planted weight outliers in block 0 and a spike in block 1's down_proj."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    plant_weight_outliers(model, blocks=(0,), projections=("gate",), dims=2, magnitude=100.0)
    ids = calibration_windows(tok, CAL)
    common = int(torch.bincount(ids.flatten()).argmax())
    with torch.no_grad():  # a massive activation at one frequent token, in block 0's down_proj input
        emb = model.model.embed_tokens.weight
        emb[common] *= 60.0
        d = emb[common] / emb[common].norm()
        model.model.layers[0].mlp.up_proj.weight[3] = 4.0 * d
        model.model.layers[0].mlp.gate_proj.weight[3] = 4.0 * d
    return scan(model, tok, ScanConfig(calibration=CAL, progress=False), input_ids=ids)


def test_report_has_all_verdict_kinds(report):
    verdicts = {f.name: f.verdict for f in report.layers}
    assert verdicts["model.layers.0.mlp.down_proj"] == "activation-spike"
    assert verdicts["model.layers.0.mlp.up_proj"] in ("weight-outlier", "both")
    assert report.summary.counts["ok"] == 14 - len(report.flagged())


def test_json_round_trip_and_schema(report, tmp_path):
    path = tmp_path / "scan.json"
    write_json(report, str(path))
    data = json.loads(path.read_text())
    assert data["schema"] == SCHEMA == "qdoctor.scan/1"
    assert set(data) >= {"schema", "qdoctor_version", "model", "config", "summary", "layers", "timing"}
    layer = data["layers"][0]
    assert set(layer) >= {"name", "block", "projection", "in_features", "out_features", "weight", "activation",
                          "errors", "spike_ratio", "verdict", "reasons"}
    back = read_json(str(path))
    assert back.to_dict() == ScanReport.from_dict(data).to_dict()
    assert json.loads(report_to_json(back)) == data  # stable: JSON → report → JSON
    assert back.layer("model.layers.0.mlp.down_proj").errors["out_w_channel"] == \
        report.layer("model.layers.0.mlp.down_proj").errors["out_w_channel"]


def test_read_json_rejects_other_files(tmp_path):
    p = tmp_path / "other.json"
    p.write_text(json.dumps({"schema": "something/else"}))
    with pytest.raises(QDoctorError, match="qdoctor.scan/1"):
        read_json(str(p))
    with pytest.raises(QDoctorError, match="no such"):
        read_json(str(tmp_path / "missing.json"))


def test_markdown_summary(report):
    md = render_markdown(report)
    assert md.startswith("# qdoctor scan")
    for line in report.summary.lines:
        assert f"- {line}" in md
    assert "## Flagged layers" in md and "model.layers.0.mlp.down_proj" in md
    assert "| layer | verdict |" in md


def test_html_is_self_contained_with_decodable_plots(report, tmp_path):
    page = render_html(report)
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(imgs) >= 7  # 3 heatmaps, 2 error strips, error bars, token profile (+ channel/dim profiles)
    for b64 in imgs:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from outside
    assert "<script" not in page
    for line in report.summary.lines:
        assert line.split(":")[0] in page
    out = tmp_path / "r.html"
    write_html(report, str(out))
    assert out.read_text() == page


def test_scan_cli_on_tiny_model(tiny_llama_dir, tmp_path, capsys):
    js, ht, md = tmp_path / "s.json", tmp_path / "s.html", tmp_path / "s.md"
    code = main(["scan", "--model", str(tiny_llama_dir), "--calib-samples", "2", "--calib-seqlen", "32",
                 "--json", str(js), "--html", str(ht), "--markdown", str(md), "--quiet", "--spike-ratio", "12"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("# qdoctor scan")
    data = json.loads(js.read_text())
    assert data["schema"] == "qdoctor.scan/1" and len(data["layers"]) == 14
    assert data["config"]["thresholds"]["spike_ratio"] == 12.0
    assert data["config"]["calibration"]["n_samples"] == 2
    assert data["timing"]["wall_seconds"] > 0 and data["timing"]["peak_rss_mb"] > 0
    assert ht.read_text().startswith("<!doctype html>") and md.read_text() == out.rstrip("\n") + "\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("args,needle", [
    (["--json", "/nonexistent/dir/s.json"], "does not exist"),
    (["--spike-factor", "0.5"], "spike factor"),
    (["--spike-ratio", "1"], "thresholds"),
    (["--sensitivity", "layer", "--sensitivity-scheme", "w4a4-magic"], "unknown scheme"),
])
def test_scan_cli_bad_input_is_one_line(args, needle, tiny_llama_dir, capsys):
    assert main(["scan", "--model", str(tiny_llama_dir), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
