"""Scan reports as versioned JSON (schema ``qdoctor.scan/1``, docs/scan.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from qdoctor.errors import QDoctorError
from qdoctor.io import atomic_write_text
from qdoctor.scan.findings import ScanReport


def _clean(obj):
    """JSON has no NaN/inf: write them as null (a layer whose error could not be computed)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def report_to_json(report: ScanReport) -> str:
    return json.dumps(_clean(report.to_dict()), allow_nan=False, separators=(",", ":")) + "\n"


def write_json(report: ScanReport, path: str) -> Path:
    """Write atomically (temporary file, then rename)."""
    return atomic_write_text(path, report_to_json(report))


def read_json(path: str) -> ScanReport:
    p = Path(path)
    if not p.is_file():
        raise QDoctorError(f"{path}: no such scan report")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QDoctorError(f"{path}: not JSON ({e})") from None
    return ScanReport.from_dict(data)
