"""Activation quantization: one fused pass on CUDA (Triton), the reference elsewhere.

Every function returns exactly (bit for bit) what its ``reference`` counterpart returns:

    per-token INT8:  s[t] = absmax_k |x[t, k]| / 127 (1 if the row is all zero),
                     q[t, k] = clamp(round_half_even(x[t, k] / s[t]), −127, 127)
    per-tensor INT8: q = clamp(round_half_even(x / s), −127, 127), s given (calibrated)
    per-group INT8:  as per-token, over each block of g consecutive k of a row
    FP8 E4M3:        s = absmax / 448, q = e4m3(clamp(x / s, −448, 448))

x is (..., K) in bf16, fp16 or fp32; q has x's shape; per-token scales have shape x.shape[:-1].
"""

from __future__ import annotations

import torch

from qdoctor.kernels import reference
from qdoctor.kernels._support import as_rows, require, use_kernels


def _rows(x: torch.Tensor, fp8: bool, scale: torch.Tensor | None = None):
    from qdoctor.kernels._triton_act_quant import quantize_rows

    require(x.is_floating_point(), f"x must be a float tensor, got {x.dtype}")
    q, s = quantize_rows(as_rows(x), fp8=fp8, scale=scale)
    return q.reshape(x.shape), s


def _static_scale(x: torch.Tensor, scale) -> torch.Tensor:
    """The per-tensor scale as a 1-element fp32 tensor on x's device (no host sync)."""
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(1)
    require(s.numel() == 1, "a per-tensor scale must be a single number")
    return s


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 per-token dynamic quantization. Returns (q int8 (..., K), s fp32 (...,))."""
    if not use_kernels(x):
        return reference.quantize_per_token_reference(x)
    q, s = _rows(x, fp8=False)
    return q, s.reshape(x.shape[:-1])


def quantize_per_tensor(x: torch.Tensor, scale) -> torch.Tensor:
    """INT8 static per-tensor quantization with a calibrated scale s > 0. Returns q int8."""
    if not use_kernels(x):
        return reference.quantize_per_tensor_reference(x, scale)
    return _rows(x, fp8=False, scale=_static_scale(x, scale))[0]


def quantize_per_group(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 per-token-per-group dynamic quantization (groups of g consecutive k).

    Returns (q int8 (..., K), s fp32 (..., K/g))."""
    k = x.shape[-1]
    require(group_size > 0 and k % group_size == 0, f"group size {group_size} must divide K = {k}")
    if not use_kernels(x):
        return reference.quantize_per_group_reference(x, group_size)
    # Each group is a row of the (T·K/g, g) view: the per-token kernel does the work.
    q, s = _rows(as_rows(x).reshape(-1, group_size), fp8=False)
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], k // group_size)


def quantize_per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 E4M3 per-token dynamic quantization. Returns (q float8_e4m3fn (..., K), s fp32 (...,))."""
    if not use_kernels(x):
        return reference.quantize_per_token_fp8_reference(x)
    q, s = _rows(x, fp8=True)
    return q, s.reshape(x.shape[:-1])


def quantize_per_tensor_fp8(x: torch.Tensor, scale) -> torch.Tensor:
    """FP8 E4M3 static per-tensor quantization with a calibrated scale s > 0."""
    if not use_kernels(x):
        return reference.quantize_per_tensor_reference(x, scale, fp8=True)
    return _rows(x, fp8=True, scale=_static_scale(x, scale))[0]
