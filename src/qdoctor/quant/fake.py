"""Quantize-dequantize ("fake quantization") of a tensor under a ``QuantSpec``.

    x̂ = D(Q(x; s), s),  s = absmax_G(x) / qmax   (G = the spec's granularity)

or, for static activations, s is the calibrated per-tensor scale passed in. The absmax a that
sets s is chosen by the spec's observer (``SCALE_OBSERVERS``): ``absmax`` (a = absmax_G(x)) or
``mse`` (a clip search: a = c*·absmax_G(x), c* minimising the quantization error of each group).
This is the
numerical model of W8A8 inference used everywhere on CPU: an integer GEMM with int32
accumulation followed by rescaling equals x̂ ŵᵀ up to fp32 rounding.
"""

from __future__ import annotations

import torch

from qdoctor.errors import QDoctorError
from qdoctor.quant.fp8 import fake_quantize_fp8, quantize_fp8
from qdoctor.quant.granularity import PerGroup
from qdoctor.quant.int8 import fake_quantize_int8, quantize_int8
from qdoctor.quant.scales import absmax, group_view, reduce_per_scale, scale_from_absmax
from qdoctor.quant.spec import QuantSpec

# dtype → x̂ = D(Q(x; s)) for an x and a scale that broadcasts against it (elementwise scales too)
FAKE_QUANTIZERS = {"int8": fake_quantize_int8, "fp8": fake_quantize_fp8}
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
    """s = a / qmax (shape per ``scales.absmax``), at least ``MIN_SCALE``, a chosen from x by the
    spec's observer (``SCALE_OBSERVERS``; an observer of calibration statistics such as
    ``percentile`` has no meaning on one tensor, which then takes its absmax). A tensor holding
    NaN/Inf is refused (its absmax — where both propagate — is checked, a few floats)."""
    _check_input(x)
    a = absmax(x, spec.granularity)
    if not bool(torch.isfinite(a).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise QDoctorError(f"cannot quantize a tensor holding {bad} NaN/Inf value(s) (shape {tuple(x.shape)})")
    if spec.observer in SCALE_OBSERVERS:
        a = SCALE_OBSERVERS[spec.observer](x, spec, a)
    return scale_from_absmax(a, spec.qmax).clamp_min(MIN_SCALE)


def fake_quantize(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x̂ in fp32 with x's shape. ``scale`` (e.g. a static activation scale) overrides the
    scale computed from x."""
    _check_input(x)
    if scale is None:
        scale = compute_scale(x, spec)
    fq = FAKE_QUANTIZERS[spec.dtype]
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


# Clip ratios the ``mse`` observers search, largest first: c ∈ {1.00, 0.99, …, 0.30}.
# c = 1 (absmax) is in the grid, so a search is never worse than absmax on the data it searched.
# Step 0.01: the error curve of 8-bit formats is flat to well within 1 % of the scale near its
# minimum. Floor 0.30: below it over two thirds of the range would be saturated — the regime of
# rare large values (activation spikes, which act as attention sinks and matter more than their
# share of a mean square); a layer that wants c < 0.3 is one to keep or smooth, not to clip.
CLIP_GRID: tuple[float, ...] = tuple(round(1.0 - 0.01 * i, 2) for i in range(71))


def clip_error(x: torch.Tensor, spec: QuantSpec, amax: torch.Tensor,
               max_elems: int = ROW_BLOCK_ELEMS) -> torch.Tensor:
    """E[g] = Σ_{i in g} (x_i − D(Q(x_i; s_g)))²  per scale group g, s = max(amax/qmax, MIN_SCALE)
    (``amax`` shaped as ``scales.absmax`` returns it; an entry 0 gets s = 1). Over blocks of rows
    of a 2-D x (``row_slices``: fp32 copies of ≤ ``max_elems``); the result has ``amax``'s shape."""
    scale = scale_from_absmax(amax, spec.qmax).clamp_min(MIN_SCALE)
    per_row = scale.dim() > 0 and x.dim() == 2 and scale.shape[0] == x.shape[0]
    parts = []
    for r in row_slices(x.shape[0], x.shape[-1], max_elems) if x.dim() == 2 else [slice(None)]:
        xr = x[r].float()
        err = (fake_quantize(xr, spec, scale[r] if per_row else scale) - xr).square_()
        parts.append(reduce_per_scale(err, spec.granularity, torch.sum))
    return torch.cat(parts) if per_row else torch.stack(parts).sum(0)


def clip_search(amax: torch.Tensor, error_of, grid: tuple[float, ...] = CLIP_GRID) -> torch.Tensor:
    """a* = c*·amax per scale group,  c* = argmin_{c ∈ grid} error_of(c·amax)  (``error_of`` maps a
    candidate absmax to the error per group, shaped as it): one evaluation per grid point, every
    group at once. Grid points are tried largest first and only a strictly smaller error moves a
    group off its earlier choice, so ties keep the larger scale (c = 1 first: never worse than absmax)."""
    best_amax, best_err = amax, error_of(amax)
    for c in grid:
        if c == 1.0:
            continue
        cand = amax * c
        err = error_of(cand)
        better = err < best_err
        best_amax, best_err = torch.where(better, cand, best_amax), torch.where(better, err, best_err)
    return best_amax


def mse_clip_absmax(x: torch.Tensor, spec: QuantSpec, amax: torch.Tensor) -> torch.Tensor:
    """The ``mse`` observer of one tensor (weights): a* = c*·absmax_G(x) per group g with
    c* = argmin_{c ∈ CLIP_GRID} Σ_{i in g} (x_i − D(Q(x_i; c·absmax_g/qmax)))²  (``clip_search``
    over ``clip_error``: one pass over x per grid point, never a loop over rows)."""
    return clip_search(amax, lambda cand: clip_error(x, spec, cand))


def absmax_observer(x: torch.Tensor, spec: QuantSpec, amax: torch.Tensor) -> torch.Tensor:
    """a = absmax_G(x)."""
    return amax


# observer name → f(x, spec, absmax_G(x)) → the absmax a the scale is set from (s = a / qmax)
# (the names ``spec.WEIGHT_OBSERVERS`` lets weights use)
SCALE_OBSERVERS = {"absmax": absmax_observer, "mse": mse_clip_absmax}
