"""Scan: find each model's W8A8 weak spots — weight outliers and activation spikes.

    from qdoctor.scan import scan, ScanConfig
    report = scan(model, tokenizer, ScanConfig())
    print("\\n".join(report.summary.lines))
    report.layer("model.layers.11.mlp.down_proj").errors["out_a_tensor_static_int8"]

See docs/scan.md for the report schema (``qdoctor.scan/1``) and how verdicts are decided.
"""

from qdoctor.quant.scales import group_size_for
from qdoctor.scan.config import ScanConfig, Thresholds
from qdoctor.scan.findings import (
    ACTIVATION_SPIKE,
    BOTH,
    ERROR_KEYS,
    OK,
    SCHEMA,
    VERDICTS,
    WEIGHT_OUTLIER,
    ActivationStats,
    LayerFinding,
    ScanReport,
    ScanSummary,
    WeightStats,
)
from qdoctor.scan.run import classify, scan, scan_with_stats, summarize

__all__ = ["scan", "scan_with_stats", "ScanConfig", "Thresholds", "ScanReport", "ScanSummary", "LayerFinding",
           "WeightStats", "ActivationStats", "classify", "summarize", "group_size_for", "SCHEMA", "ERROR_KEYS",
           "VERDICTS", "OK", "WEIGHT_OUTLIER", "ACTIVATION_SPIKE", "BOTH"]
