"""Why a given recipe loses accuracy on this model (``qdoctor fix --start-from RECIPE``).

The recipe is measured like every plan of the search (held-out perplexity or the task metric:
it is the search's naive plan); the loss is attributed with the scan's evidence, read *under the
recipe's scheme*:

- weight-outlier layers: the INT8 weight output error of the granularity the recipe gives the
  layer (per-channel: ``out_w_channel``; per-group g: the scan's error for g) above the search's
  threshold (Qin 2024: > 1 % only in the outlier layers). Per-tensor INT8 weights share one scale
  over every row, so their error is at least the per-channel one (reported as such); FP8 weights
  are not flagged (the scan measures INT8 errors);
- activation-spike layers: spike ratio ≥ the search's minimum *and* activations quantized with
  one scale per tensor (static or dynamic) — a per-token scale confines a spike to its own token;
- whether the recipe's smoothing reaches the layer (a smoothing step selects the pair feeding it).
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field

from qdoctor.quant.granularity import PerChannel, PerGroup, PerTensor


@dataclass
class LayerDiagnosis:
    name: str
    scheme: str  # the recipe's layer scheme, e.g. "int8 W:channel A:tensor-static"
    reasons: list[str] = field(default_factory=list)
    weight_error: float | None = None  # INT8 weight output error under the recipe's weight granularity
    spike_ratio: float = 0.0
    smoothed: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StartDiagnosis:
    """The start recipe's measured loss and the layers the evidence blames, worst first."""

    recipe: str
    value: float  # the search metric of the recipe (held-out PPL or mean accuracy)
    delta: float  # vs full precision (% for ppl, points for tasks)
    unit: str
    layers: list[LayerDiagnosis] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"recipe": self.recipe, "value": self.value, "delta": self.delta, "unit": self.unit,
                "layers": [x.to_dict() for x in self.layers]}


def smoothed_layers(recipe, names: list[str], arch, config) -> set[str]:
    """The layers among ``names`` whose input a smoothing step of ``recipe`` rescales (the step
    selects a pair when any of its consumers matches one of its globs, as ``smooth_block``)."""
    out = set()
    for name in names:
        rel = _block_rel(name, arch)
        block = name[: len(name) - len(rel)]
        for pair in arch.pairs_for(config):
            if rel not in pair.consumers:
                continue
            consumers = [block + c for c in pair.consumers]
            if any(fnmatch.fnmatchcase(c, g) for step in recipe.smoothing for c in consumers for g in step.layers):
                out.add(name)
    return out


def _block_rel(name: str, arch) -> str:
    """``model.layers.3.mlp.down_proj`` → ``mlp.down_proj``."""
    rest = name[len(arch.blocks) + 1:]
    return rest.split(".", 1)[1] if "." in rest else rest


def diagnose(recipe, evidence: dict, trial, metric_name: str, weight_threshold: float, spike_min: float,
             arch, config) -> StartDiagnosis:
    """Attribute the start recipe's loss (``trial``: its search Trial) to layers (module docstring)."""
    smoothed = smoothed_layers(recipe, list(evidence), arch, config)
    out = []
    for name, e in evidence.items():
        ls = recipe.scheme.resolve(name)
        if ls is None or not ls.is_quantized:
            continue
        d = LayerDiagnosis(name=name, scheme=ls.describe(), spike_ratio=e.spike_ratio, smoothed=name in smoothed)
        w, a = ls.weights, ls.activations
        if w.dtype == "int8":
            g = w.granularity
            if isinstance(g, PerGroup):
                d.weight_error = e.group_errors.get(g.group_size, e.out_w_group if g.group_size == e.group_size
                                                    else None)
            elif isinstance(g, (PerChannel, PerTensor)):
                d.weight_error = e.out_w_channel
            if d.weight_error is not None and d.weight_error > weight_threshold:
                bound = "≥ " if isinstance(g, PerTensor) else ""
                d.reasons.append(f"weight outlier: INT8 {'per-tensor' if bound else g.name} weight output error "
                                 f"{bound}{100 * d.weight_error:.2f}% (> {100 * weight_threshold:.0f}%)")
        if a is not None and isinstance(a.granularity, PerTensor) and e.spike_ratio >= spike_min:
            d.reasons.append(f"activation spike: spike ratio {e.spike_ratio:.0f} under one "
                             f"{'static' if not a.dynamic else 'dynamic'} per-tensor scale")
        if d.reasons:
            out.append(d)
    out.sort(key=lambda d: (not d.reasons[0].startswith("weight"), -(d.weight_error or 0.0), -d.spike_ratio))
    return StartDiagnosis(recipe=recipe.scheme.name, value=trial.value, delta=trial.delta,
                          unit="%" if metric_name == "ppl" else "points", layers=out)
