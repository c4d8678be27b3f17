"""What a scan measures and how it decides: ``ScanConfig`` and ``Thresholds``.

Thresholds (docs/scan.md, "Verdicts", shows the measured distributions behind them):

- **weight-outlier** — cause *and* symptom:
  * the largest input-dimension absmax p[j] = max_n |W[n, j]| exceeds ``weight_dim_ratio`` (25) ×
    the median p: a per-row INT8 scale set by that column leaves the row's typical weights
    ≈ 127/25 ≈ 5 levels (Qin 2024's signature: > 90 on a few input dims vs ≈ 1 elsewhere);
  * and the per-channel INT8 weight-only output error ‖XWᵀ − XQ(W)ᵀ‖/‖XWᵀ‖ on calibration
    activations exceeds ``weight_error`` (1%, Qin's "above 1% in those layers only").
  The error alone is not enough: real 4-bit-grid weights (SmolLM2 v_proj) reach 1.5–2% with no
  outlier dimension — a diffuse difficulty per-group does not fix, reported as a note.
- **activation-spike** — ``spike_ratio`` (mean over samples of max/median per-token absmax, Yang
  et al. 2024) exceeds ``spike_ratio`` (10): per-tensor INT8 then leaves the typical token fewer
  than 127/10 ≈ 13 levels (< 4 bits); Yang et al.'s released keep-lists reach down to ratios
  11–13. The token-level ``spike_factor`` (which tokens are reported as spikes and always enter
  the error subsample) defaults to the same 10, so flagged layers also show the spike tokens
  behind the verdict (``stats.spikes.DEFAULT_SPIKE_FACTOR`` = 20 is stricter).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from qdoctor.calib.collect import CalibrationConfig
from qdoctor.errors import QDoctorError


SENSITIVITY_MODES = ("layer", "projection")

# Group sizes tried for a layer whose per-channel weights lose too much (scan: ``group_errors``;
# fix: the coarsest that meets the threshold), coarsest first.
GROUP_CANDIDATES = (128, 64, 32, 16)
# The plan search keeps a layer out of INT8 only above this spike ratio: twice the scan's flag
# (``Thresholds.spike_ratio``), since keeping costs a GEMM off the INT8 path (docs/fix.md).
FIX_SPIKE_MIN_RATIO = 20.0


@dataclass(frozen=True)
class Thresholds:
    """When a layer's evidence earns a verdict (see the module docstring for the why)."""

    weight_error: float = 0.01  # and out_w_channel above this (Qin's 1% criterion)
    weight_dim_ratio: float = 25.0  # max_j p[j] / median_j p[j] above this …
    spike_ratio: float = 10.0  # spike_ratio above this → activation-spike

    def __post_init__(self):
        if self.weight_error <= 0 or self.weight_dim_ratio <= 1 or self.spike_ratio <= 1:
            raise QDoctorError("thresholds: weight_error must be > 0, weight_dim_ratio and spike_ratio > 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Thresholds":
        return cls(**{f.name: float(d[f.name]) for f in fields(cls) if f.name in d})


@dataclass(frozen=True)
class ScanConfig:
    """Everything a scan depends on.

    calibration: the calibration windows (default 64 × 512 tokens of WikiText-2 valid).
    spike_factor: a token spikes when its absmax > spike_factor × its sample's median token absmax.
    group_size: preferred INT8 weight group size; when it does not divide K the largest divisor
        of K below it is used (recorded per layer as ``group_size``).
    error_tokens: size of the uniform, seeded subsample of calibration tokens on which the
        quantization errors are computed; every spike token of the layer is added to it
        (up to ``max_spike_rows``) and the sample is re-weighted so the estimate is unbiased.
    stats_threads: torch threads for the per-layer statistics and errors (0 = torch's setting).
        They are many small tensor ops, for which one thread is as fast as two on an idle machine
        and several times faster on a busy one (OpenMP threads spin-wait for a descheduled
        sibling); the block forwards keep torch's setting.
    sensitivity: None (default, off), ``"layer"`` (PPL change when only that linear layer is
        quantized) or ``"projection"`` (only that projection type, in every block).
    """

    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    thresholds: Thresholds = field(default_factory=Thresholds)
    spike_factor: float = 10.0
    group_size: int = 128
    error_tokens: int = 1024
    max_spike_rows: int = 1024
    top_dims: int = 5
    stats_threads: int = 1
    sensitivity: str | None = None
    sensitivity_scheme: str = "w8a8-channel-tensor-static"
    sensitivity_source: str = "wikitext2:valid"
    sensitivity_windows: int = 2
    sensitivity_seqlen: int = 512
    activation_errors: bool = True  # False: weight-side errors only (what the plan search reads)
    progress: bool = True

    def __post_init__(self):
        if self.spike_factor <= 1:
            raise QDoctorError(f"spike factor must be > 1, got {self.spike_factor}")
        if self.group_size < 1:
            raise QDoctorError(f"group size must be a positive integer, got {self.group_size}")
        if self.stats_threads < 0:
            raise QDoctorError("stats_threads must be ≥ 0")
        if self.error_tokens < 1 or self.max_spike_rows < 0:
            raise QDoctorError("error_tokens must be ≥ 1 and max_spike_rows ≥ 0")
        if self.sensitivity is not None and self.sensitivity not in SENSITIVITY_MODES:
            raise QDoctorError(f"sensitivity must be one of {', '.join(SENSITIVITY_MODES)} (or off), "
                               f"got {self.sensitivity!r}")
        if self.sensitivity_windows < 1 or self.sensitivity_seqlen < 2:
            raise QDoctorError("sensitivity needs ≥ 1 window of ≥ 2 tokens")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)
             if f.name not in ("calibration", "thresholds", "progress", "stats_threads")}
        d["calibration"] = asdict(self.calibration)
        d["thresholds"] = self.thresholds.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ScanConfig":
        d = dict(d)
        calib = d.pop("calibration", None)
        thr = d.pop("thresholds", None)
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if calib is not None:
            kwargs["calibration"] = CalibrationConfig(**calib)
        if thr is not None:
            kwargs["thresholds"] = Thresholds.from_dict(thr)
        return cls(**kwargs)
