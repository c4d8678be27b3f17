"""Verified checkpoint: the number in the card is the checkpoint's own.

Before the staging directory is renamed into place (``export.staging``), the written checkpoint
is loaded back with transformers (``AutoModelForCausalLM.from_pretrained``, compressed-tensors
decompresses the weights and fake-quantizes the layer inputs with its own rules) and its
perplexity measured on the same windows as qdoctor's simulation of the plan:

    gap = 100 · (PPL_reloaded / PPL_simulated − 1)   [%]

A |gap| above ``tolerance_pct`` (0.3 %) fails the export: the staging directory is removed and
nothing is published. The residual gap of a correct export is the loaders' rounding rule for
dynamic INT8 activations (compressed-tensors: absmax/127.5, codes in [−128, 127]; qdoctor and
vLLM: absmax/127) and kept layers running in the checkpoint dtype (tests/export/test_smollm2_roundtrip.py).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qdoctor.errors import QDoctorError
from qdoctor.eval.perplexity import perplexity

TOLERANCE_PCT = 0.3


@dataclass(frozen=True)
class VerifySpec:
    """What to verify on: token windows (``eval.perplexity.token_windows``) and the allowed gap."""

    windows: torch.Tensor
    tolerance_pct: float = TOLERANCE_PCT
    text: str = "wikitext2:test"


@dataclass
class Verification:
    simulated_ppl: float
    reloaded_ppl: float
    windows: int
    seqlen: int
    text: str
    tolerance_pct: float
    seconds: float = 0.0

    @property
    def gap_pct(self) -> float:
        return gap_pct(self.reloaded_ppl, self.simulated_ppl)

    @property
    def ok(self) -> bool:
        return abs(self.gap_pct) <= self.tolerance_pct

    def to_dict(self) -> dict:
        return {**asdict(self), "gap_pct": self.gap_pct, "ok": self.ok}

    def line(self) -> str:
        return (f"reloaded checkpoint PPL {self.reloaded_ppl:.4f} vs qdoctor's simulation {self.simulated_ppl:.4f} "
                f"({self.gap_pct:+.3f}%, limit ±{self.tolerance_pct}%) on {self.windows} × {self.seqlen} tokens of "
                f"{self.text}")


def gap_pct(reloaded: float, simulated: float) -> float:
    """100 · (reloaded / simulated − 1)."""
    return 100.0 * (reloaded / simulated - 1.0)


def simulated_ppl(model, tokenizer, windows: torch.Tensor, recipe=None, stats=None) -> float:
    """qdoctor's perplexity of the plan: the recipe applied block by block (``Recipe.perplexity``),
    or the model as it is when it is already quantized (``recipe`` None)."""
    if recipe is None:
        return perplexity(model, tokenizer, windows=windows, progress=False).ppl
    return recipe.perplexity(model, tokenizer, windows, stats, desc="perplexity (simulated)")[0].ppl


def reloaded_ppl(path: "str | Path", tokenizer, windows: torch.Tensor, dtype: torch.dtype) -> float:
    """Perplexity of the checkpoint at ``path`` as transformers loads it (on CPU, in ``dtype``)."""
    from transformers import AutoModelForCausalLM

    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except Exception as e:  # a checkpoint transformers cannot load is a failed export, in one line
        raise QDoctorError(f"verification: transformers cannot load the written checkpoint "
                           f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    try:
        return perplexity(loaded, tokenizer, windows=windows, progress=False).ppl
    finally:
        del loaded


def verify_checkpoint(path, model, tokenizer, spec: VerifySpec, recipe=None, stats=None,
                      dtype: torch.dtype = torch.float32) -> Verification:
    """Both perplexities on ``spec.windows`` (see the module docstring); never raises on a gap."""
    t0 = time.perf_counter()
    sim = simulated_ppl(model, tokenizer, spec.windows, recipe, stats)
    got = reloaded_ppl(path, tokenizer, spec.windows, dtype)
    return Verification(sim, got, int(spec.windows.shape[0]), int(spec.windows.shape[1]), spec.text,
                        spec.tolerance_pct, time.perf_counter() - t0)
