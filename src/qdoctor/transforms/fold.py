"""Fold a per-channel scale S through a producer → consumers pair (function preserving).

For a consumer computing Y = X Wᵀ with X produced by ``producer``:

    Y = (X diag(S)⁻¹) (W diag(S))ᵀ

so the producer's output channel j is divided by S_j and every consumer's input column j is
multiplied by S_j. The producer is

- an RMSNorm computing x̂ · (o + w) (o = ``ArchSpec.norm_offset``: 0, or 1 for Gemma):
  o + w'_j = (o + w_j) / S_j  ⇒  w'_j = (o + w_j) / S_j − o;
- a linear (v→o, up→down): its output row j and bias j are divided by S_j.
  (up→down holds because down's input is act(gate) ⊙ up, linear in up's rows.)

Computed in float64 and written back in the parameters' dtype.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from qdoctor.errors import QDoctorError
from qdoctor.models.registry import ArchSpec, SmoothPair


def _weight(mod: nn.Module) -> torch.Tensor:
    w = getattr(mod, "weight", None)
    if w is None:
        raise QDoctorError(f"{type(mod).__name__} has no weight to fold a scale into")
    return w


@torch.no_grad()
def fold_scales(block: nn.Module, arch: ArchSpec, pair: SmoothPair, scales: torch.Tensor) -> None:
    """Apply S (shape (K,), positive, finite) to ``pair`` inside ``block``, in place."""
    s = scales.detach().double().flatten().to(next(block.parameters()).device)
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise QDoctorError(f"smoothing scales for {pair.producer} must be positive and finite")
    producer = block.get_submodule(pair.producer)
    consumers = [block.get_submodule(c) for c in pair.consumers]
    for c in consumers:
        w = _weight(c)
        if w.shape[1] != s.numel():
            raise QDoctorError(f"{pair.producer}→{type(c).__name__}: {s.numel()} scales for {w.shape[1]} inputs")
        w.copy_((w.double() * s).to(w.dtype))
    pw = _weight(producer)
    if pair.kind == "norm":
        o = arch.norm_offset
        pw.copy_(((o + pw.double()) / s - o).to(pw.dtype))
    elif pair.kind == "linear":
        pw.copy_((pw.double() / s[:, None]).to(pw.dtype))
        if getattr(producer, "bias", None) is not None:
            producer.bias.copy_((producer.bias.double() / s).to(producer.bias.dtype))
    else:
        raise QDoctorError(f"unknown producer kind {pair.kind!r}")


def pair_for_consumer(arch: ArchSpec, config, consumer: str) -> SmoothPair | None:
    """The (valid) pair whose consumers include ``consumer`` (block-relative name)."""
    for p in arch.pairs_for(config):
        if consumer in p.consumers:
            return p
    return None
