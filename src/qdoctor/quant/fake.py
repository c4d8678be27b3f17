"""Quantize-dequantize ("fake quantization") of a tensor under a ``QuantSpec``.

    x̂ = D(Q(x; s), s),  s = absmax_G(x) / qmax   (G = the spec's granularity)

or, for static activations, s is the calibrated per-tensor scale passed in. This is the
numerical model of W8A8 inference used everywhere on CPU: an integer GEMM with int32
accumulation followed by rescaling equals x̂ ŵᵀ up to fp32 rounding.
"""

from __future__ import annotations

import torch

from qdoctor.errors import QDoctorError
from qdoctor.quant.fp8 import fake_quantize_fp8, quantize_fp8
from qdoctor.quant.granularity import PerGroup
from qdoctor.quant.int8 import fake_quantize_int8, quantize_int8
from qdoctor.quant.scales import absmax, group_view, scale_from_absmax
from qdoctor.quant.spec import QuantSpec

_FAKE = {"int8": fake_quantize_int8, "fp8": fake_quantize_fp8}
_QUANT = {"int8": quantize_int8, "fp8": quantize_fp8}


# The smallest scale: s = absmax/qmax of a subnormal absmax would underflow to 0 (x / 0 = NaN);
# with s ≥ the smallest normal fp32 such values quantize to 0, within s/2 of themselves.
MIN_SCALE = torch.finfo(torch.float32).tiny


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not (x.is_floating_point() and not x.is_complex()):
        raise QDoctorError(f"quantizers take a real floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if x.numel() == 0:
        raise QDoctorError(f"cannot quantize an empty tensor (shape {tuple(x.shape)})")


def compute_scale(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """s = absmax_G(x) / qmax (shape per ``scales.absmax``), at least ``MIN_SCALE``; a tensor
    holding NaN/Inf is refused (its absmax — where both propagate — is checked, a few floats)."""
    _check_input(x)
    a = absmax(x, spec.granularity)
    if not bool(torch.isfinite(a).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise QDoctorError(f"cannot quantize a tensor holding {bad} NaN/Inf value(s) (shape {tuple(x.shape)})")
    return scale_from_absmax(a, spec.qmax).clamp_min(MIN_SCALE)


def fake_quantize(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x̂ in fp32 with x's shape. ``scale`` (e.g. a static activation scale) overrides the
    scale computed from x."""
    _check_input(x)
    if scale is None:
        scale = compute_scale(x, spec)
    fq = _FAKE[spec.dtype]
    if isinstance(spec.granularity, PerGroup):
        xg = group_view(x.float(), spec.granularity.group_size)
        return fq(xg, scale).reshape(x.shape)
    return fq(x.float(), scale)


def quantize(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale): int8 or float8_e4m3fn codes with x's shape, fp32 scale.

    For per-group specs the scale has shape (..., K/g) (one per row and group)."""
    _check_input(x)
    if scale is None:
        scale = compute_scale(x, spec)
    q = _QUANT[spec.dtype]
    if isinstance(spec.granularity, PerGroup):
        xg = group_view(x.float(), spec.granularity.group_size)
        return q(xg, scale).reshape(x.shape), scale.squeeze(-1)
    return q(x.float(), scale), scale


ROW_BLOCK_ELEMS = 1 << 26  # elements per block of rows (256 MB in fp32) for the row-blocked computations


def row_slices(n_rows: int, row_len: int, max_elems: int = ROW_BLOCK_ELEMS) -> list[slice]:
    """Consecutive blocks of whole rows of an (n_rows, row_len) tensor, each ≤ ``max_elems``
    elements (at least one row): what every computation that is a sum or a map over rows uses to
    bound its fp32 working copies of a large weight or logit matrix."""
    step = max(1, max_elems // max(row_len, 1))
    return [slice(a, min(a + step, n_rows)) for a in range(0, n_rows, step)]


def quantize_rows(w: torch.Tensor, spec: QuantSpec, scale: torch.Tensor,
                  max_elems: int = ROW_BLOCK_ELEMS) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize(w, spec, scale)`` for a 2-D weight with its scale already known, over blocks of
    rows: the rows are then independent, and the fp32 temporaries stay ≤ ``max_elems`` elements
    (a 28672 × 8192 weight would otherwise need ~3 fp32 copies, 0.94 GB each). Same result."""
    n, k = w.shape
    blocks = row_slices(n, k, max_elems)
    if len(blocks) == 1:
        return quantize(w, spec, scale)
    per_row = scale.dim() > 0 and scale.shape[0] == n  # per-channel (N, 1), per-group (N, K/g, 1)
    parts = [quantize(w[r], spec, scale[r] if per_row else scale) for r in blocks]
    codes = torch.cat([p[0] for p in parts])
    return codes, (torch.cat([p[1] for p in parts]) if per_row else parts[0][1])
