"""Absmax reductions and scales for every granularity (pure tensor functions).

For a tensor x whose last dimension is the input/channel dimension K:

- per-tensor:  a = max |x|                         shape ()
- per-channel: a[n] = max_k |x[n, k]|              shape (N, 1)    (weights, rows = output channels)
- per-token:   a[t] = max_k |x[t, k]|              shape (..., 1)  (activations, rows = tokens)
- per-group g: a[r, b] = max_{k in block b} |x[r, k]|, blocks of g consecutive k,
               returned as shape (..., K/g, 1) for ``x.reshape(..., K/g, g)``.

A scale is s = a / qmax (qmax = 127 for INT8, 448 for FP8 E4M3), kept in fp32.
An all-zero group has a = 0; its scale is set to 1 so that Q(x) = 0 and nothing divides by 0.
"""

from __future__ import annotations

import torch

from qdoctor.errors import QDoctorError
from qdoctor.quant.granularity import Granularity, PerChannel, PerGroup, PerTensor, PerToken


def check_finite(x: torch.Tensor, what: str = "tensor") -> None:
    """Raise a clear error if x holds NaN or inf (quantization scales would be meaningless)."""
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise QDoctorError(f"{what} holds {bad} NaN/inf value(s); cannot quantize it")


def group_view(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """View x (..., K) as (..., K/g, g); K must be divisible by g."""
    k = x.shape[-1]
    if k % group_size != 0:
        raise QDoctorError(
            f"group size {group_size} does not divide the input dimension {k}; "
            f"choose a divisor of {k} (e.g. {largest_divisor_at_most(k, group_size)})"
        )
    return x.reshape(*x.shape[:-1], k // group_size, group_size)


def largest_divisor_at_most(k: int, g: int) -> int:
    for d in range(min(g, k), 0, -1):
        if k % d == 0:
            return d
    return 1


def group_size_for(k: int, preferred: int = 128) -> int:
    """g = ``preferred`` when it divides K, else the largest divisor of K below it (K = 576 → 96)."""
    return preferred if k % preferred == 0 else largest_divisor_at_most(k, preferred)


def absmax(x: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """max |x| over the elements that share one scale (see module docstring for shapes)."""
    return reduce_per_scale(x.detach().abs().float(), granularity, torch.amax)


def reduce_per_scale(t: torch.Tensor, granularity: Granularity, op) -> torch.Tensor:
    """``op`` (``torch.amax``, ``torch.sum``) of t over the elements that share one scale, shaped as
    ``absmax`` returns it: () per tensor, (..., 1) per row, (..., K/g, 1) per group."""
    if isinstance(granularity, PerTensor):
        return op(t)
    if isinstance(granularity, (PerChannel, PerToken)):
        return op(t, dim=-1, keepdim=True)
    if isinstance(granularity, PerGroup):
        return op(group_view(t, granularity.group_size), dim=-1, keepdim=True)
    raise QDoctorError(f"unknown granularity {granularity!r}")


def scale_from_absmax(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """s = absmax / qmax in fp32; groups with absmax 0 get s = 1."""
    amax = amax.float()
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
