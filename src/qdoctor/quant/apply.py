"""``quantize(model, scheme)``: replace ``nn.Linear`` modules by ``QuantLinear`` per a ``Scheme``.

Every ``nn.Linear`` of the model is visited (so families without a registry entry for some
projection are still covered), except the scheme's ignore globs (``lm_head`` by default).
Embeddings are not linear layers and are never quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from qdoctor.errors import QDoctorError
from qdoctor.quant.linear import QuantLinear
from qdoctor.quant.spec import LayerScheme, Scheme, get_scheme


@dataclass
class QuantizeResult:
    scheme: Scheme
    layers: dict[str, LayerScheme]  # name → scheme actually applied
    ignored: list[str]

    def merge(self, other: "QuantizeResult") -> None:
        """Add what ``other`` applied (another block of the same plan)."""
        self.layers.update(other.layers)
        self.ignored.extend(other.ignored)

    @property
    def kept(self) -> int:
        """Layers kept out of quantization (``keep``)."""
        return sum(1 for ls in self.layers.values() if ls.keep)

    @property
    def quantized(self) -> int:
        return len(self.layers) - self.kept

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for ls in self.layers.values():
            out[ls.describe()] = out.get(ls.describe(), 0) + 1
        return out


def layer_scheme_for(scheme: Scheme, name: str, weight_dtype: torch.dtype) -> LayerScheme | None:
    """The ``LayerScheme`` ``quantize`` gives layer ``name``: the scheme's, or None when the layer is
    left as it is — ignored, or kept in fp32 when its weights already are fp32."""
    ls = scheme.resolve(name)
    return None if ls is None or (ls.keep == "fp32" and weight_dtype == torch.float32) else ls


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize(model: nn.Module, scheme: "Scheme | str", calibration=None,
             overrides: dict[str, "LayerScheme | dict"] | None = None, progress: bool = True,
             prefix: str = "", weights: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> QuantizeResult:
    """Quantize ``model`` in place.

    scheme: a ``Scheme`` or a named scheme (``qdoctor.quant.spec.NAMED_SCHEMES``).
    calibration: ``CalibrationStats`` — required when any layer uses static activations;
        the static scale of layer L is s = observer(stats[L]) / qmax.
    overrides: extra {glob: LayerScheme or its dict} applied after the scheme's own
        (e.g. ``{"model.layers.11.mlp.down_proj": {"keep": "bf16"}}``).
    weights: {full name: (Ŵ, scale)} — weights already rounded (GPTQ) that the named quantized
        layers use as they are, with exactly that scale (``QuantLinear``'s ``weight``/``weight_scale``).
    prefix: the full name of ``model`` inside a larger model (e.g. ``"model.layers.3."`` to
        quantize one decoder block); scheme globs and calibration look up ``prefix + name``.
    """
    scheme = get_scheme(scheme)
    if overrides:
        scheme = scheme.with_overrides(
            {k: v if isinstance(v, LayerScheme) else LayerScheme.from_dict(v) for k, v in overrides.items()})
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise QDoctorError("model is already quantized; call qdoctor.quant.restore(model) first")
    targets = [(prefix + n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not targets:
        raise QDoctorError("model has no nn.Linear layers to quantize")
    applied: dict[str, LayerScheme] = {}
    ignored: list[str] = []
    replacements: dict[str, QuantLinear] = {}  # swapped in only once every layer succeeded
    for name, lin in tqdm(targets, desc=f"quantizing ({scheme.name})", unit="layer", leave=False, disable=not progress):
        ls = layer_scheme_for(scheme, name, lin.weight.dtype)
        if ls is None:
            ignored.append(name)
            continue
        act_scale = None
        if ls.needs_calibration:
            if calibration is None:
                raise QDoctorError(f"scheme {scheme.name!r} uses static activation scales: calibrate first "
                                   "(qdoctor.calibrate) and pass calibration=")
            a = calibration.act_absmax(name, ls.activations.observer, ls.activations)
            act_scale = torch.tensor(a / ls.activations.qmax if a > 0 else 1.0, dtype=torch.float32)
        w_hat, w_scale = (weights or {}).get(name, (None, None)) if ls.is_quantized else (None, None)
        replacements[name] = QuantLinear(lin, ls, act_scale, name=name, weight=w_hat, weight_scale=w_scale)
        applied[name] = ls
    for name, module in replacements.items():
        _set_module(model, name[len(prefix):], module)
    return QuantizeResult(scheme=scheme, layers=applied, ignored=ignored)


def restore(model: nn.Module) -> int:
    """Undo ``quantize``: put the original ``nn.Linear`` back everywhere. Returns the count."""
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    for n in names:
        _set_module(model, n, model.get_submodule(n).to_linear())
    return len(names)
