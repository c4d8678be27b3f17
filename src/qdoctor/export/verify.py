"""Verified checkpoint: the number in the card is the checkpoint's own.

Before the staging directory is renamed into place (``export.staging``), the written checkpoint
is loaded back with transformers (``AutoModelForCausalLM.from_pretrained``, compressed-tensors
decompresses the weights and fake-quantizes the layer inputs with its own rules) and its
perplexity measured on the same windows as qdoctor's simulation of the plan, twice: with
qdoctor's own rounding (= vLLM's kernels) and under the loader's rounding rule
(``loader_rounding``), which is what transformers computes with the checkpoint:

    gap = 100 · (PPL_reloaded / PPL_simulated-under-the-loader's-rule − 1)   [%]

A |gap| above ``tolerance_pct`` (0.3 %) fails the export: the staging directory is removed and
nothing is published. Both simulated numbers are reported: the difference between them is the
loaders' rounding rule, not an export error (SmolLM2-135M W8A8 per-channel/per-token, 2 × 2048
WikiText-2 test tokens: reloaded 19.5426 vs qdoctor's rule 19.4482, +0.49 %).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from qdoctor.errors import QDoctorError
from qdoctor.eval.perplexity import perplexity
from qdoctor.quant.granularity import PerGroup, PerTensor
from qdoctor.quant.linear import QuantLinear, apply_input_transform

TOLERANCE_PCT = 0.3


@dataclass(frozen=True)
class VerifySpec:
    """What to verify on: token windows (``eval.perplexity.token_windows``) and the allowed gap."""

    windows: torch.Tensor
    tolerance_pct: float = TOLERANCE_PCT
    text: str = "wikitext2:test"


@dataclass
class Verification:
    simulated_ppl: float  # qdoctor's rounding (= vLLM's kernels)
    reloaded_ppl: float
    loader_rule_ppl: float  # qdoctor's simulation under the loader's rounding rule
    windows: int
    seqlen: int
    text: str
    tolerance_pct: float
    seconds: float = 0.0

    @property
    def gap_pct(self) -> float:
        """Reloaded vs the simulation under the loader's rule: what the export must not change."""
        return gap_pct(self.reloaded_ppl, self.loader_rule_ppl)

    @property
    def rounding_gap_pct(self) -> float:
        """Reloaded vs qdoctor's own rounding: the loaders' rule, not an export error."""
        return gap_pct(self.reloaded_ppl, self.simulated_ppl)

    @property
    def ok(self) -> bool:
        return abs(self.gap_pct) <= self.tolerance_pct

    def to_dict(self) -> dict:
        return {**asdict(self), "gap_pct": self.gap_pct, "rounding_gap_pct": self.rounding_gap_pct, "ok": self.ok}

    def line(self) -> str:
        return (f"reloaded checkpoint PPL {self.reloaded_ppl:.4f} vs qdoctor's simulation under the loader's rounding "
                f"rule {self.loader_rule_ppl:.4f} ({self.gap_pct:+.3f}%, limit ±{self.tolerance_pct}%; qdoctor's own "
                f"rounding {self.simulated_ppl:.4f}) on {self.windows} × {self.seqlen} tokens of {self.text}")


def gap_pct(reloaded: float, simulated: float) -> float:
    """100 · (reloaded / simulated − 1)."""
    return 100.0 * (reloaded / simulated - 1.0)


def loader_fake_quantize(x: torch.Tensor, spec, input_scale: torch.Tensor | None) -> torch.Tensor:
    """compressed-tensors' fake quantization of a layer input (quantization/lifecycle/forward.py, 0.20):

        dynamic:  s = absmax / h   (h = 127.5 for INT8 — the symmetric range (127 − (−128)) / 2 —, 448 for FP8;
                                    absmax per tensor, per token, or per group of the last dim)
        static:   s = the stored input_scale
        INT8:     x̂ = s · clamp(round(x / s), −128, 127)        FP8: x̂ = s · e4m3(clamp(x / s, ±448))

    (qdoctor and vLLM: INT8 s = absmax / 127, codes in [−127, 127].)"""
    xf = x.float()
    g = spec.granularity
    if isinstance(g, PerGroup):
        xf = xf.unflatten(-1, (xf.shape[-1] // g.group_size, g.group_size))
    if spec.dynamic:
        amax = xf.abs().amax() if isinstance(g, PerTensor) else xf.abs().amax(dim=-1, keepdim=True)
        s = amax / (127.5 if spec.dtype == "int8" else 448.0)
        s = torch.where(s == 0, torch.full_like(s, torch.finfo(torch.float32).eps), s)
    else:
        s = input_scale.float()
    if spec.dtype == "int8":
        q = torch.round(torch.clamp(xf / s, -128, 127))
    else:
        q = torch.clamp(xf / s, -448, 448).to(torch.float8_e4m3fn).float()
    return (q * s).reshape(x.shape)


def loader_forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """What transformers computes for one exported layer: the stored ŵ, the input fake-quantized by
    ``loader_fake_quantize``; kept layers as a plain matmul in the checkpoint's precision (no bf16/fp16
    rounding of their inputs and outputs)."""
    bias = layer.bias.float() if layer.bias is not None else None
    x = apply_input_transform(layer, x)  # the checkpoint's transform_config (R4), applied before quantization
    s = layer.scheme
    x_hat = x.float() if s.keep or s.activations is None else loader_fake_quantize(x, s.activations, layer.input_scale)
    return F.linear(x_hat, layer.weight_hat, bias).to(x.dtype)


@contextmanager
def loader_rounding():
    """Every ``QuantLinear`` computes ``loader_forward`` while the ``with`` lasts (the layers a recipe
    creates block by block included), as it did after."""
    saved = QuantLinear.forward
    QuantLinear.forward = loader_forward
    try:
        yield
    finally:
        QuantLinear.forward = saved


def simulated_ppl(model, tokenizer, windows: torch.Tensor, recipe=None, stats=None, gptq=None) -> float:
    """qdoctor's perplexity of the plan: the recipe applied block by block (``Recipe.perplexity``;
    ``gptq``: the GPTQ weights the checkpoint holds, so the pass is not run again), or the model as
    it is when it is already quantized (``recipe`` None)."""
    if recipe is None:
        return perplexity(model, tokenizer, windows=windows, progress=False).ppl
    return recipe.perplexity(model, tokenizer, windows, stats, desc="perplexity (simulated)", gptq=gptq)[0].ppl


def reloaded_ppl(path: "str | Path", tokenizer, windows: torch.Tensor, dtype: torch.dtype) -> float:
    """Perplexity of the checkpoint at ``path`` as transformers loads it (on CPU, in ``dtype``)."""
    from transformers import AutoModelForCausalLM

    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except Exception as e:  # a checkpoint transformers cannot load is a failed export, in one line
        raise QDoctorError(f"verification: transformers cannot load the written checkpoint "
                           f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    try:
        config = json.loads((Path(path) / "config.json").read_text())
        transforms = (config.get("quantization_config") or {}).get("transform_config")
        if transforms:  # transformers does not apply them on load (vLLM does): do what a transformers user must
            from compressed_tensors.transform import TransformConfig, apply_transform_config
            apply_transform_config(loaded, TransformConfig.model_validate(transforms))
        return perplexity(loaded, tokenizer, windows=windows, progress=False).ppl
    finally:
        del loaded


def verify_checkpoint(path, model, tokenizer, spec: VerifySpec, recipe=None, stats=None,
                      dtype: torch.dtype = torch.float32, gptq=None) -> Verification:
    """Both perplexities on ``spec.windows`` (see the module docstring); never raises on a gap.
    ``gptq``: the plan's GPTQ weights as written (``Recipe.gptq_weights``)."""
    t0 = time.perf_counter()
    sim = simulated_ppl(model, tokenizer, spec.windows, recipe, stats, gptq)
    with loader_rounding():
        rule = simulated_ppl(model, tokenizer, spec.windows, recipe, stats, gptq)
    got = reloaded_ppl(path, tokenizer, spec.windows, dtype)
    return Verification(sim, got, rule, int(spec.windows.shape[0]), int(spec.windows.shape[1]), spec.text,
                        spec.tolerance_pct, time.perf_counter() - t0)
