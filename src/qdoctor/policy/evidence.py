"""Per-layer evidence the plan search ranks layers by: the scan's findings (one diagnosis).

The search does not measure layers itself; it reads what ``qdoctor.scan`` found — the same
recorder, error estimator and thresholds (``scan.config``) — from a scan run on the fly or
saved (``qdoctor fix --scan scan.json``):

- ``spike_ratio``: mean over samples of max/median per-token absmax of the layer input, the
  activation-spike signature (Maisonnave 2025);
- ``out_w_channel`` / ``out_w_group``: output error ‖XWᵀ − XQ(W)ᵀ‖/‖XWᵀ‖ with INT8 per-channel /
  per-group weights on the scan's error subsample, the weight-outlier signature (Qin 2024:
  > 1% in the outlier layers only);
- ``group_errors``: the same error for each candidate group size (``scan.config.GROUP_CANDIDATES``),
  for the layers above the scan's weight-error threshold;
- ``weight_absmax``: max|W|.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from qdoctor.quant.granularity import PerGroup
from qdoctor.quant.scales import group_size_for
from qdoctor.quant.spec import QuantSpec
from qdoctor.scan.config import GROUP_CANDIDATES
from qdoctor.stats.quant_error import weight_output_rel_error


@dataclass
class LayerEvidence:
    name: str
    spike_ratio: float
    act_absmax: float
    weight_absmax: float
    out_w_channel: float
    out_w_group: float
    group_size: int
    group_errors: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_finding(cls, f) -> "LayerEvidence":
        """The evidence in a scan's ``LayerFinding``."""
        return cls(name=f.name, spike_ratio=f.spike_ratio, act_absmax=f.activation.absmax,
                   weight_absmax=f.weight.max_abs, out_w_channel=f.errors["out_w_channel"],
                   out_w_group=f.errors["out_w_group"], group_size=f.weight.group_size,
                   group_errors={int(g): e for g, e in (f.group_errors or {}).items()})

    def needed_group_size(self, threshold: float) -> int | None:
        """The coarsest group size whose weight output error is ≤ ``threshold``; the finest one
        if none is; None when the scan measured no group sizes for this layer."""
        if not self.group_errors:
            return None
        sizes = sorted(self.group_errors, reverse=True)
        return next((g for g in sizes if self.group_errors[g] <= threshold), sizes[-1])


def evidence_from_scan(report) -> dict[str, LayerEvidence]:
    """Layer name → ``LayerEvidence`` of every layer of a ``ScanReport``."""
    return {f.name: LayerEvidence.from_finding(f) for f in report.layers}


def choose_group_size(x: torch.Tensor, w: torch.Tensor, threshold: float,
                      candidates: tuple[int, ...] = GROUP_CANDIDATES) -> tuple[int, float]:
    """(g, error): the coarsest group size among the divisors of K in ``candidates`` whose INT8
    per-group weight output error on the unweighted rows x is ≤ threshold; the finest one if
    none is. (A second derivation of ``needed_group_size``, on plain rows: tests, experiments.)"""
    k = w.shape[1]
    sizes = sorted({g for g in candidates if k % g == 0} or {group_size_for(k, min(candidates))}, reverse=True)
    err = float("inf")
    for g in sizes:
        err = weight_output_rel_error(x, w, QuantSpec("int8", PerGroup(g)))
        if err <= threshold:
            return g, err
    return sizes[-1], err


def rank_spikes(evidence: dict[str, LayerEvidence], min_ratio: float) -> list[str]:
    """Layers with spike_ratio ≥ min_ratio, most spiky first."""
    sel = [e for e in evidence.values() if e.spike_ratio >= min_ratio]
    return [e.name for e in sorted(sel, key=lambda e: -e.spike_ratio)]


def rank_weight_outliers(evidence: dict[str, LayerEvidence], threshold: float) -> list[str]:
    """Layers whose per-channel INT8 weight output error exceeds ``threshold``, worst first."""
    sel = [e for e in evidence.values() if e.out_w_channel > threshold]
    return [e.name for e in sorted(sel, key=lambda e: -e.out_w_channel)]


def cap(names: list[str], total_layers: int, fraction: float) -> list[str]:
    """At most floor(fraction × total) names (the budget on layers out of the default)."""
    return names[: int(torch.floor(torch.tensor(fraction * total_layers)).item())]
