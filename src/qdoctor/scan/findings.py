"""What a scan finds: one ``LayerFinding`` per linear layer, a ``ScanSummary``, the ``ScanReport``.

All of it is plain data (floats, ints, lists, dicts) so ``to_dict``/``from_dict`` round-trip
through JSON exactly (schema ``qdoctor.scan/1``, docs/scan.md).

``LayerFinding.errors`` has flat keys (consumed by the treatment policy — keep the names):

    out_w_tensor, out_w_channel, out_w_group       ‖XWᵀ − XQ(W)ᵀ‖/‖XWᵀ‖, INT8 weights only
    w_tensor, w_channel, w_group                   ‖W − Q(W)‖/‖W‖
    out_a_{tensor_static,tensor_dynamic,token_dynamic}_{int8,fp8}   ‖XWᵀ − Q(X)Wᵀ‖/‖XWᵀ‖, W exact
    a_{tensor_static,tensor_dynamic,token_dynamic}_{int8,fp8}       ‖X − Q(X)‖/‖X‖
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from qdoctor.errors import QDoctorError

SCHEMA = "qdoctor.scan/1"

OK = "ok"
WEIGHT_OUTLIER = "weight-outlier"
ACTIVATION_SPIKE = "activation-spike"
BOTH = "both"
VERDICTS = (OK, WEIGHT_OUTLIER, ACTIVATION_SPIKE, BOTH)

WEIGHT_GRANULARITIES = ("tensor", "channel", "group")
ACT_MODES = ("tensor_static", "tensor_dynamic", "token_dynamic")
ACT_DTYPES = ("int8", "fp8")
ERROR_KEYS = (
    tuple(f"out_w_{g}" for g in WEIGHT_GRANULARITIES)
    + tuple(f"w_{g}" for g in WEIGHT_GRANULARITIES)
    + tuple(f"out_a_{m}_{d}" for d in ACT_DTYPES for m in ACT_MODES)
    + tuple(f"a_{m}_{d}" for d in ACT_DTYPES for m in ACT_MODES)
)


@dataclass
class WeightStats:
    """Weight-outlier statistics of W (N × K), ``stats.weights``."""

    max_abs: float  # max |W|
    median_dim_absmax: float  # median_j p[j], p[j] = max_n |W[n, j]|
    max_median_ratio: float  # max_j p[j] / median_j p[j]
    top_dims: list[list[float]]  # [[input dim j, p[j]], …] largest first
    group_size: int  # the g used for out_w_group / w_group
    dim_absmax: list[float] = field(default_factory=list)  # the profile p (K,)


@dataclass
class ActivationStats:
    """Statistics of the layer's input X over every calibration token (``stats.spikes``)."""

    absmax: float  # max |X|
    median_token_max: float  # the typical token's absmax (median over samples of per-sample medians)
    max_token_max: float  # the largest token absmax
    spike_ratio: float  # mean over samples of max_t / median_t token absmax
    spike_factor: float  # a token spikes when its absmax > spike_factor × its sample's median
    spike_tokens: int  # number of spiking tokens
    spike_samples: int  # samples holding at least one spike
    samples: int
    spike_positions: dict[str, int]  # {position: count} (JSON keys are strings)
    spike_token_ids: dict[str, int]  # {token id: count}
    spike_token_text: dict[str, str]  # {token id: decoded text}
    spike_channels: list[list[float]]  # [[channel, max |x| over spike tokens], …]
    top_channels: list[list[float]]  # [[channel, channel absmax], …] over every token
    error_tokens: int  # rows the errors were computed on (uniform sample + spike tokens)
    # median over sampled non-spike tokens of ‖e_t‖/‖y_t‖ per activation mode (e.g. "tensor_static_int8")
    typical_token_errors: dict[str, float] = field(default_factory=dict)
    channel_absmax: list[float] = field(default_factory=list)  # (K,)
    token_max_by_position: list[float] = field(default_factory=list)  # (L,) max over samples
    token_median_by_position: list[float] = field(default_factory=list)  # (L,) median over samples


@dataclass
class LayerFinding:
    name: str
    block: int
    projection: str  # e.g. "down_proj"
    in_features: int
    out_features: int
    weight: WeightStats
    activation: ActivationStats
    errors: dict[str, float]
    spike_ratio: float
    verdict: str = OK
    reasons: list[str] = field(default_factory=list)
    sensitivity: dict[str, float] | None = None  # {"ppl": …, "delta_pct": …} when measured
    group_errors: dict[str, float] | None = None  # {"128": e, "64": …}: per-group weight errors, weight-error layers

    @property
    def weight_outlier(self) -> bool:
        return self.verdict in (WEIGHT_OUTLIER, BOTH)

    @property
    def activation_spike(self) -> bool:
        return self.verdict in (ACTIVATION_SPIKE, BOTH)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerFinding":
        d = dict(d)
        d["weight"] = WeightStats(**d["weight"])
        d["activation"] = ActivationStats(**d["activation"])
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass
class ScanSummary:
    layers: int
    counts: dict[str, int]  # verdict → number of layers
    weight_outlier_layers: list[str]
    activation_spike_layers: list[str]
    lines: list[str]  # the human summary, one finding per line
    worst_spike: str | None = None
    worst_weight: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ScanSummary":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass
class ScanReport:
    model: dict[str, Any]  # source, family, model_type, blocks, hidden size, …
    config: dict[str, Any]  # ScanConfig.to_dict()
    layers: list[LayerFinding]
    summary: ScanSummary
    sensitivity: dict[str, Any] | None = None  # baseline PPL, scheme, windows, per-projection results
    timing: dict[str, float] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    qdoctor_version: str = ""
    statistics: str | None = None  # the calibration statistics saved beside the JSON (file name), if any

    def layer(self, name: str) -> LayerFinding:
        for f in self.layers:
            if f.name == name:
                return f
        raise QDoctorError(f"no layer {name!r} in this scan")

    def flagged(self, verdict: str | None = None) -> list[LayerFinding]:
        """Layers whose verdict is not ok (or is exactly ``verdict``)."""
        return [f for f in self.layers if (f.verdict != OK if verdict is None else f.verdict == verdict)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "qdoctor_version": self.qdoctor_version,
            "model": self.model,
            "config": self.config,
            "summary": self.summary.to_dict(),
            "layers": [f.to_dict() for f in self.layers],
            "sensitivity": self.sensitivity,
            "timing": self.timing,
            "environment": self.environment,
            "statistics": self.statistics,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ScanReport":
        schema = d.get("schema")
        if schema != SCHEMA:
            raise QDoctorError(f"not a qdoctor scan report of schema {SCHEMA} (found {schema!r})")
        return cls(model=d["model"], config=d["config"], layers=[LayerFinding.from_dict(x) for x in d["layers"]],
                   summary=ScanSummary.from_dict(d["summary"]), sensitivity=d.get("sensitivity"),
                   timing=d.get("timing", {}), environment=d.get("environment", {}),
                   qdoctor_version=d.get("qdoctor_version", ""), statistics=d.get("statistics"))
