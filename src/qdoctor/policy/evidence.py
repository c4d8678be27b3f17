"""Per-layer evidence the policies rank layers by, from calibration statistics.

- ``spike_ratio``: mean over samples of max/median per-token absmax of the layer input
  (``stats.spikes``), the activation-spike signature (Maisonnave 2025).
- ``out_w_channel`` / ``out_w_group``: output error ‖XWᵀ − XQ(W)ᵀ‖/‖XWᵀ‖ with INT8
  per-channel / per-group weights on sampled calibration rows (``stats.quant_error``), the
  weight-outlier signature (Qin 2024: > 1% in the outlier layers only).
- ``weight_absmax``: max|W|.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from qdoctor.quant.granularity import PerChannel, PerGroup
from qdoctor.quant.scales import largest_divisor_at_most
from qdoctor.quant.spec import QuantSpec
from qdoctor.stats.quant_error import weight_output_rel_error
from qdoctor.stats.spikes import spike_ratio


@dataclass
class LayerEvidence:
    name: str
    spike_ratio: float
    act_absmax: float
    weight_absmax: float
    out_w_channel: float
    out_w_group: float
    group_size: int

    def to_dict(self) -> dict:
        return asdict(self)


def group_size_for(k: int, preferred: int = 128) -> int:
    """g = preferred if it divides K, else the largest divisor of K below it."""
    return preferred if k % preferred == 0 else largest_divisor_at_most(k, preferred)


GROUP_CANDIDATES = (128, 64, 32, 16)


def choose_group_size(x: torch.Tensor, w: torch.Tensor, threshold: float,
                      candidates: tuple[int, ...] = GROUP_CANDIDATES) -> tuple[int, float]:
    """(g, error): the coarsest group size among the divisors of K in ``candidates`` whose INT8
    per-group weight output error on rows x is ≤ threshold; the finest one if none is."""
    k = w.shape[1]
    sizes = sorted({g for g in candidates if k % g == 0} or {group_size_for(k, min(candidates))}, reverse=True)
    err = float("inf")
    for g in sizes:
        err = weight_output_rel_error(x, w, QuantSpec("int8", PerGroup(g)))
        if err <= threshold:
            return g, err
    return sizes[-1], err


def layer_evidence(model, stats, group_size: int = 128) -> dict[str, LayerEvidence]:
    """Evidence for every layer in ``stats`` (needs sampled rows for the output errors)."""
    return {name: layer_evidence_of(name, model.get_submodule(name).weight, st, group_size)
            for name, st in stats.layers.items()}


def layer_evidence_of(name: str, weight, st, group_size: int = 128) -> LayerEvidence:
    """The evidence of one layer from its weight and its ``LinearInputStats``."""
    w = weight.detach()  # fp32 copies are made in row blocks by weight_output_rel_error
    g = group_size_for(w.shape[1], group_size)
    if st.rows is not None:
        x = st.rows.to(w.device)
        e_ch = weight_output_rel_error(x, w, QuantSpec("int8", PerChannel()))
        e_gr = weight_output_rel_error(x, w, QuantSpec("int8", PerGroup(g)))
    else:
        e_ch = e_gr = float("nan")
    return LayerEvidence(name=name, spike_ratio=spike_ratio(st.token_absmax), act_absmax=st.tensor_absmax,
                         weight_absmax=float(w.abs().max()), out_w_channel=e_ch, out_w_group=e_gr, group_size=g)


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
