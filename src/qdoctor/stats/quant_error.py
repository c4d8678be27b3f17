"""Quantization error of one linear layer on calibration activations (our definitions, SCIENCE.md).

    output_rel_error = ‖X Wᵀ − Q_x(X) Q_w(W)ᵀ‖_F / ‖X Wᵀ‖_F
    weight_rel_error = ‖W − Q_w(W)‖_F / ‖W‖_F
    act_rel_error    = ‖X − Q_x(X)‖_F / ‖X‖_F

Q_x = identity gives the weight-only part of the output error; Q_w = identity the
activation-only part. A per-layer output error above 1% is the Qin-paper symptom.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qdoctor.quant.fake import ROW_BLOCK_ELEMS, fake_quantize, row_slices
from qdoctor.quant.spec import QuantSpec


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    den = float(ref.norm())
    return float((a - ref).norm()) / den if den > 0 else 0.0


def weight_rel_error(w: torch.Tensor, spec: QuantSpec) -> float:
    w = w.detach().float()
    return _rel(fake_quantize(w, spec), w)


def act_rel_error(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None) -> float:
    x = x.detach().float()
    return _rel(fake_quantize(x, spec, scale), x)


def output_rel_error(x: torch.Tensor, w: torch.Tensor, w_spec: QuantSpec | None,
                     a_spec: QuantSpec | None = None, act_scale: torch.Tensor | None = None) -> float:
    """‖X Wᵀ − Q_x(X) Q_w(W)ᵀ‖_F / ‖X Wᵀ‖_F; a spec of None leaves that operand exact."""
    w = w.detach().float()
    x = x.detach().float().reshape(-1, x.shape[-1]).to(w.device)
    ref = F.linear(x, w)
    if act_scale is not None:
        act_scale = torch.as_tensor(act_scale, device=w.device)
    xq = x if a_spec is None else fake_quantize(x, a_spec, act_scale)
    wq = w if w_spec is None else fake_quantize(w, w_spec)
    return _rel(F.linear(xq, wq), ref)


def weight_output_rel_error(x: torch.Tensor, w: torch.Tensor, spec: QuantSpec,
                            max_elems: int = ROW_BLOCK_ELEMS) -> float:
    """``output_rel_error(x, w, spec)`` — weights quantized, activations exact — for a row-local
    ``spec`` (per-channel, per-group), computed over blocks of output rows of W: ‖X(Ŵ − W)ᵀ‖² and
    ‖XWᵀ‖² are sums over rows n, so the fp32 copies of W stay ≤ ``max_elems`` elements."""
    from qdoctor.quant.granularity import PerChannel, PerGroup

    if not isinstance(spec.granularity, (PerChannel, PerGroup)):
        return output_rel_error(x, w, spec)  # a per-tensor scale needs all of W at once
    w = w.detach()
    x = x.detach().float().reshape(-1, x.shape[-1]).to(w.device)
    num = den = 0.0
    for rows in row_slices(w.shape[0], w.shape[1], max_elems):
        wc = w[rows].float()
        ref = F.linear(x, wc)
        num += float((F.linear(x, fake_quantize(wc, spec)) - ref).square().sum())
        den += float(ref.square().sum())
    return (num / den) ** 0.5 if den > 0 else 0.0


# --- Row-weighted variants, for errors estimated on a stratified subsample of tokens (scan) ---
#
# With a stratified subsample — the rare "spike" tokens (all of them, weight 1, or a uniform
# subset weighted by their count / the subset's size) plus a uniform sample of the other tokens
# (weight = their count / the sample's size) — the weighted sums of squares below are unbiased
# estimates of the full-calibration-set sums, so their ratio estimates the full-set error.


def row_sq_norms(x: torch.Tensor) -> torch.Tensor:
    """‖x_t‖² for every row t of x (..., D) → (T,), in fp32."""
    return torch.linalg.vector_norm(x.detach().float().reshape(-1, x.shape[-1]), dim=-1).square()


def weighted_norm_ratio(num_sq: torch.Tensor, den_sq: torch.Tensor, row_weights: torch.Tensor | None = None) -> float:
    """sqrt(Σ_t w_t num_sq[t] / Σ_t w_t den_sq[t]) (0 when the denominator is 0)."""
    if row_weights is not None:
        wt = row_weights.detach().float().reshape(-1)
        num_sq, den_sq = num_sq * wt, den_sq * wt
    den = float(den_sq.sum())
    return (float(num_sq.sum()) / den) ** 0.5 if den > 0 else 0.0


def weighted_rel_error(approx: torch.Tensor, ref: torch.Tensor, row_weights: torch.Tensor | None = None) -> float:
    """sqrt(Σ_t w_t ‖approx_t − ref_t‖²) / sqrt(Σ_t w_t ‖ref_t‖²) over rows t (w ≡ 1 when None)."""
    return weighted_norm_ratio(row_sq_norms(approx.float() - ref.float()), row_sq_norms(ref), row_weights)


def sampled_output_rel_error(x: torch.Tensor, w: torch.Tensor, w_spec: QuantSpec | None = None,
                             a_spec: QuantSpec | None = None, act_scale: torch.Tensor | None = None,
                             row_weights: torch.Tensor | None = None, ref: torch.Tensor | None = None) -> float:
    """``output_rel_error`` with per-row weights: ‖X Wᵀ − Q_x(X) Q_w(W)ᵀ‖ / ‖X Wᵀ‖ where each row's
    squared norm counts ``row_weights[t]`` times. ``act_scale`` may hold one scale per row (T, 1)
    (e.g. the per-sequence scale of per-tensor dynamic quantization). ``ref`` = X Wᵀ if already
    computed. Equals ``output_rel_error`` when ``row_weights`` is None and the scale is shared."""
    w = w.detach().float()
    x = x.detach().float().reshape(-1, x.shape[-1]).to(w.device)
    if ref is None:
        ref = F.linear(x, w)
    if act_scale is not None:
        act_scale = torch.as_tensor(act_scale, device=w.device)
    xq = x if a_spec is None else fake_quantize(x, a_spec, act_scale)
    wq = w if w_spec is None else fake_quantize(w, w_spec)
    return weighted_rel_error(F.linear(xq, wq), ref, row_weights)


def sampled_act_rel_error(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None,
                          row_weights: torch.Tensor | None = None) -> float:
    """``act_rel_error`` with per-row weights: ‖X − Q_x(X)‖ / ‖X‖ (row t counts ``row_weights[t]`` times)."""
    x = x.detach().float().reshape(-1, x.shape[-1])
    return weighted_rel_error(fake_quantize(x, spec, scale), x, row_weights)


# --- Gram forms: the same sums of squares without forming X Wᵀ (cheaper when N > K or X is shared) ---
#
#     Σ_t w_t ‖x_t Dᵀ‖² = Σ_n d_n G d_nᵀ,   G = Σ_t w_t x_tᵀ x_t  (K × K)   — one G per input, any D
#     ‖x_t Wᵀ‖²       = x_t H x_tᵀ,        H = Wᵀ W              (K × K)   — one H per weight, any x


def weighted_gram(x: torch.Tensor, row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """G = Σ_t w_t x_tᵀ x_t = Xᵀ diag(w) X, (K, K) in fp32."""
    x = x.detach().float().reshape(-1, x.shape[-1])
    xw = x if row_weights is None else x * row_weights.detach().float().reshape(-1, 1)
    return xw.T @ x


def gram_sq_norm(d: torch.Tensor, gram: torch.Tensor) -> float:
    """Σ_n d_n G d_nᵀ = Σ_t w_t ‖x_t Dᵀ‖² for the G of ``weighted_gram`` (D: (N, K))."""
    d = d.detach().float()
    return float(((d @ gram) * d).sum())


def rows_quadratic_form(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(T,) with x_t M x_tᵀ; with M = Wᵀ W this is ‖x_t Wᵀ‖² per row."""
    x = x.detach().float().reshape(-1, x.shape[-1])
    return ((x @ m) * x).sum(dim=-1)
