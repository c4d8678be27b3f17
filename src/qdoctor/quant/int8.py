"""Symmetric INT8 quantization (range −127..127, no zero point).

    Q(v) = clamp(round(v / s), −127, 127),    D(q) = q · s,    s = absmax / 127

``round`` is round-half-to-even (torch.round), which is what integer kernels use.
For |v| ≤ absmax the error is bounded: |v − D(Q(v))| ≤ s / 2.
"""

from __future__ import annotations

import torch

INT8_QMAX = 127.0


def quantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q = clamp(round(x / s), −127, 127) as int8; scale broadcasts against x."""
    return torch.clamp(torch.round(x.float() / scale), -INT8_QMAX, INT8_QMAX).to(torch.int8)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x̂ = q · s in fp32."""
    return q.float() * scale


def fake_quantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """D(Q(x)) in fp32, without materialising int8 (same numbers as quantize+dequantize)."""
    return torch.clamp(torch.round(x.float() / scale), -INT8_QMAX, INT8_QMAX) * scale
