"""Pure-torch reference semantics of every kernel in ``qdoctor.kernels`` (any device).

Notation: activations x (T, K) (leading dims flattened into T tokens), weights w (N, K)
(out, in), output y (T, N). Symmetric quantization, no zero point:

    INT8:   Q(v; s) = clamp(round_half_even(v / s), −127, 127)          (int8 codes)
    FP8:    Q(v; s) = e4m3(clamp(v / s, −448, 448))   (round to nearest even, finite max 448)
    scale:  s = absmax / qmax over the elements sharing it (qmax 127 or 448); absmax 0 → s = 1

Granularities: per-token s_x[t] (dynamic), per-tensor s_x (static, calibrated, given),
per-token-per-group s_x[t, j] (dynamic, j = k // g); weights per-channel s_w[n] or per-group
s_w[n, j].

W8A8 linear (what the GEMM kernels compute):

    per-channel:  y[t, n] = (Σ_k q_x[t, k] q_w[n, k]) · s_x[t] · s_w[n]  (+ b[n])
    per-group:    y[t, n] = s_x[t] · Σ_j s_w[n, j] · (Σ_{k in group j} q_x[t, k] q_w[n, k])  (+ b[n])
                  (per-group activations: s_x[t, j] moves inside the sum over j)

This equals the fake-quantized product x̂ ŵᵀ (x̂ = q_x·s_x, ŵ = q_w·s_w, the simulation used
by ``qdoctor.quant``) up to floating-point rounding. Here the integer sums are exact
(float64 holds |Σ| ≤ 127²·K exactly) and the scaling is done in float64, so the reference
is the formula evaluated exactly and rounded once to the output dtype. The kernels
accumulate integers exactly too (int32) and scale in fp32; see docs/kernels.md for the
resulting tolerances.
"""

from __future__ import annotations

import torch

from qdoctor.kernels._support import as_rows, require

INT8_QMAX = 127.0
FP8_QMAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn
ACT_MODES = ("token", "tensor", "group")


# ---------------------------------------------------------------- quantizers


def scale_from_absmax(absmax: torch.Tensor, qmax: float) -> torch.Tensor:
    """s = absmax / qmax in fp32 (IEEE division); s = 1 where absmax = 0.

    The divisor is a tensor on purpose: on CUDA, torch divides by a Python scalar as a
    multiplication by its reciprocal, which can differ from IEEE division in the last bit."""
    absmax = absmax.float()
    return torch.where(absmax > 0, absmax / torch.full_like(absmax, qmax), torch.ones_like(absmax))


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor, fp8: bool = False) -> torch.Tensor:
    """Codes Q(x; s) in fp32 arithmetic; ``scale`` broadcasts against x."""
    v = x.float() / scale
    if fp8:
        return torch.clamp(v, -FP8_QMAX, FP8_QMAX).to(FP8_DTYPE)
    return torch.clamp(torch.round(v), -INT8_QMAX, INT8_QMAX).to(torch.int8)


def quantize_rows_reference(x: torch.Tensor, fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric quantization of each row (last dim) of x.

    s[r] = absmax_k |x[r, k]| / qmax (1 for an all-zero row), q[r, k] = Q(x[r, k]; s[r]).
    Returns (q with x's shape, int8 or float8_e4m3fn; s of shape x.shape[:-1], fp32).
    """
    scale = scale_from_absmax(x.detach().float().abs().amax(dim=-1), FP8_QMAX if fp8 else INT8_QMAX)
    return quantize_with_scale(x, scale.unsqueeze(-1), fp8), scale


def quantize_per_token_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 per-token: s[t] = absmax_k |x[t, k]| / 127, q = clamp(round(x / s[t]), ±127)."""
    return quantize_rows_reference(x)


def quantize_per_token_fp8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 E4M3 per-token: s[t] = absmax_k |x[t, k]| / 448, q = e4m3(clamp(x / s[t], ±448))."""
    return quantize_rows_reference(x, fp8=True)


def quantize_per_tensor_reference(x: torch.Tensor, scale, fp8: bool = False) -> torch.Tensor:
    """Static per-tensor: q = Q(x; s) with the given (calibrated) scalar scale s > 0."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(())
    return quantize_with_scale(x, scale, fp8)


def quantize_per_group_reference(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 per-row-per-group: s[r, j] = absmax over x[r, j·g:(j+1)·g] / 127.

    Returns (q with x's shape, s of shape x.shape[:-1] + (K/g,))."""
    k = x.shape[-1]
    require(group_size > 0 and k % group_size == 0, f"group size {group_size} must divide K = {k}")
    q, s = quantize_rows_reference(x.reshape(*x.shape[:-1], k // group_size, group_size))
    return q.reshape(x.shape), s


def quantize_weight_int8(w: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight codes for the INT8 GEMMs: per-channel s_w[n] = absmax_k |w[n, k]| / 127, or
    per-group s_w[n, j] over blocks of ``group_size`` input channels.

    Returns (q_w (N, K) int8, s_w (N,) or (N, K/g) fp32)."""
    require(w.dim() == 2, f"weight must be 2-D (N, K), got shape {tuple(w.shape)}")
    if group_size is None:
        return quantize_rows_reference(w)
    return quantize_per_group_reference(w, group_size)


def quantize_weight_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 E4M3 per-channel weight: s_w[n] = absmax_k |w[n, k]| / 448. Returns (q_w, s_w (N,))."""
    require(w.dim() == 2, f"weight must be 2-D (N, K), got shape {tuple(w.shape)}")
    return quantize_rows_reference(w, fp8=True)


# ---------------------------------------------------------------- GEMMs


def reference_int8_mm(q_x: torch.Tensor, q_w: torch.Tensor) -> torch.Tensor:
    """acc[t, n] = Σ_k q_x[t, k] · q_w[n, k] as int32, exact.

    Computed as a float64 product, which is exact while |acc| ≤ 127²·K < 2⁵³; the int32
    result is exact for K < 2³¹ / 127² ≈ 133 000."""
    require(q_x.dtype == torch.int8 and q_w.dtype == torch.int8, "int8 operands expected")
    require(q_x.shape[-1] == q_w.shape[-1], f"K mismatch: {tuple(q_x.shape)} vs {tuple(q_w.shape)}")
    require(q_x.shape[-1] * 127 * 127 < 2**31, "K too large for an int32 accumulator")
    return (q_x.double() @ q_w.double().T).to(torch.int32)


def _quantize_activations(x2: torch.Tensor, act: str, act_scale, group_size: int | None, fp8: bool = False):
    """(q_x, s_x) for the activation mode; s_x is (T,), () or (T, K/g)."""
    require(act in ACT_MODES, f"act must be one of {ACT_MODES}, got {act!r}")
    if act == "token":
        return quantize_rows_reference(x2, fp8)
    if act == "tensor":
        require(act_scale is not None, "act='tensor' needs act_scale (a calibrated per-tensor scale)")
        s = torch.as_tensor(act_scale, dtype=torch.float32, device=x2.device).reshape(())
        return quantize_with_scale(x2, s, fp8), s
    require(not fp8, "per-group activations are INT8 only")
    require(group_size is not None, "act='group' needs group_size")
    return quantize_per_group_reference(x2, group_size)


def check_linear_args(x, w_q, w_scale, act, act_scale, group_size, bias, weight_dtype=torch.int8) -> None:
    """Shape/dtype checks shared by the reference and the kernels (clear errors, not asserts)."""
    require(x.is_floating_point(), f"x must be a float tensor, got {x.dtype}")
    require(w_q.dim() == 2 and w_q.dtype == weight_dtype,
            f"w_q must be a 2-D {weight_dtype} tensor (N, K), got {w_q.dtype} {tuple(w_q.shape)}")
    n, k = w_q.shape
    require(x.shape[-1] == k, f"x has K = {x.shape[-1]} but w_q has K = {k}")
    require(act in ACT_MODES, f"act must be one of {ACT_MODES}, got {act!r}")
    if group_size is None:
        require(w_scale.numel() == n, f"per-channel w_scale needs N = {n} values, got {tuple(w_scale.shape)}")
        require(act != "group", "act='group' needs group_size")
    else:
        require(k % group_size == 0, f"group size {group_size} does not divide K = {k}")
        require(tuple(w_scale.shape) == (n, k // group_size),
                f"per-group w_scale must be (N, K/g) = ({n}, {k // group_size}), got {tuple(w_scale.shape)}")
    if act == "tensor":
        require(act_scale is not None and torch.as_tensor(act_scale).numel() == 1,
                "act='tensor' needs a scalar act_scale")
    if bias is not None:
        require(bias.shape == (n,), f"bias must have shape ({n},), got {tuple(bias.shape)}")


def _token_scale_column(s_x: torch.Tensor, m: int) -> torch.Tensor:
    """Per-token scales (M,) as a float64 column (M, 1); a per-tensor scale as a float64 scalar."""
    s_x = s_x.double()
    return s_x.reshape(-1, 1) if s_x.numel() == m and s_x.dim() >= 1 else s_x.reshape(())


def reference_int8_gemm(q_x: torch.Tensor, s_x: torch.Tensor, q_w: torch.Tensor, s_w: torch.Tensor,
                        bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """y[t, n] = (Σ_k q_x[t, k] q_w[n, k]) · s_x[t] · s_w[n] (+ b[n]), exact, rounded to out_dtype.

    s_x (M,) per-token or a single per-tensor scale; s_w (N,) per-channel."""
    y = reference_int8_mm(q_x, q_w).double() * _token_scale_column(s_x, q_x.shape[0])
    y = y * s_w.double().reshape(1, -1)
    return (y + bias.double() if bias is not None else y).to(out_dtype)


def reference_int8_gemm_grouped(q_x: torch.Tensor, s_x: torch.Tensor, q_w: torch.Tensor, s_w: torch.Tensor,
                                group_size: int, bias: torch.Tensor | None = None,
                                out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """y[t, n] = s_x[t] · Σ_j s_w[n, j] · (Σ_{k in group j} q_x[t, k] q_w[n, k]) (+ b[n]), exact.

    s_w (N, K/g); s_x (M,) per-token, a single per-tensor scale, or (M, K/g) per-group
    (then y[t, n] = Σ_j s_x[t, j] · s_w[n, j] · acc_j[t, n])."""
    per_group_act = s_x.dim() == 2
    y = torch.zeros(q_x.shape[0], q_w.shape[0], dtype=torch.float64, device=q_x.device)
    for j in range(q_w.shape[1] // group_size):
        cols = slice(j * group_size, (j + 1) * group_size)
        part = reference_int8_mm(q_x[:, cols], q_w[:, cols]).double() * s_w[:, j].double()
        y += part * s_x[:, j : j + 1].double() if per_group_act else part
    if not per_group_act:
        y = y * _token_scale_column(s_x, q_x.shape[0])
    return (y + bias.double() if bias is not None else y).to(out_dtype)


def reference_w8a8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, *, act: str = "token",
                          act_scale=None, group_size: int | None = None,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 INT8 linear layer, exact formula (module docstring), rounded once to x.dtype.

    x (..., K) float; w_q (N, K) int8; w_scale (N,) per-channel or (N, K/g) per-group
    (``group_size`` = g); act: "token" (dynamic per-token), "tensor" (static, ``act_scale``)
    or "group" (dynamic per-token-per-group, needs ``group_size``); bias (N,) or None.
    Returns y (..., N) in x.dtype.
    """
    check_linear_args(x, w_q, w_scale, act, act_scale, group_size, bias)
    x2 = as_rows(x)
    q_x, s_x = _quantize_activations(x2, act, act_scale, group_size)
    if group_size is None:
        y = reference_int8_gemm(q_x, s_x, w_q, w_scale, bias, x.dtype)
    else:
        y = reference_int8_gemm_grouped(q_x, s_x, w_q, w_scale, group_size, bias, x.dtype)
    return y.reshape(*x.shape[:-1], w_q.shape[0])


def reference_fp8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, *, act: str = "token",
                         act_scale=None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 FP8 E4M3 linear layer: y[t, n] = (Σ_k q_x[t, k] q_w[n, k]) · s_x[t] · s_w[n] (+ b[n]).

    q_x = per-token (act="token") or static per-tensor (act="tensor", ``act_scale``) FP8
    codes of x; w_q (N, K) float8_e4m3fn with per-channel w_scale (N,). Products of E4M3
    values are exact in float64, so this is the formula evaluated exactly, rounded once."""
    check_linear_args(x, w_q, w_scale, act, act_scale, None, bias, weight_dtype=FP8_DTYPE)
    require(act != "group", "FP8 supports act='token' or act='tensor'")
    x2 = as_rows(x)
    q_x, s_x = _quantize_activations(x2, act, act_scale, None, fp8=True)
    acc = q_x.double() @ w_q.double().T
    y = acc * _token_scale_column(s_x, x2.shape[0]) * w_scale.reshape(1, -1).double()
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype).reshape(*x.shape[:-1], w_q.shape[0])
