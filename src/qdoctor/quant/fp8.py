"""FP8 E4M3 quantization (``torch.float8_e4m3fn``, finite max 448).

    Q(v) = cast_e4m3(clamp(v / s, −448, 448)),    D(q) = float(q) · s,    s = absmax / 448

The cast rounds to the nearest representable E4M3 value (3 mantissa bits), so the
relative error per element is at most 2⁻⁴ for normal values.
"""

from __future__ import annotations

import torch

FP8_E4M3_QMAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q = e4m3(clamp(x / s, −448, 448))."""
    return torch.clamp(x.float() / scale, -FP8_E4M3_QMAX, FP8_E4M3_QMAX).to(FP8_DTYPE)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x̂ = float(q) · s in fp32."""
    return q.float() * scale


def fake_quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """D(Q(x)) in fp32."""
    return dequantize_fp8(quantize_fp8(x, scale), scale)
