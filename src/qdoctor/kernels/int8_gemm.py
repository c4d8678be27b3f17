"""INT8 W8A8 GEMMs with the dequantization fused into the epilogue (Triton on CUDA).

    int8_mm:            acc[t, n] = Σ_k q_x[t, k] q_w[n, k]                        (int32)
    int8_gemm:          y[t, n] = acc[t, n] · s_x[t] · s_w[n]  (+ b[n])            (per-channel)
    int8_gemm_grouped:  y[t, n] = s_x[t] · Σ_j s_w[n, j] · acc_j[t, n]  (+ b[n])   (per-group)
                        acc_j = Σ_{k in group j} q_x[t, k] q_w[n, k]; with per-group
                        activations s_x[t, j] multiplies acc_j instead.
    w8a8_linear:        quantize x (per-token, static per-tensor or per-group), then one of
                        the GEMMs above: y ≈ x̂ ŵᵀ + b in x's dtype.

Integer sums are exact (int32); scaling is fp32 and the output is rounded once to its dtype.
On CPU (or without Triton) every function computes ``reference`` instead, which is the same
formula evaluated exactly. Weights are (N, K) row-major, the nn.Linear layout.
"""

from __future__ import annotations

import functools

import torch

from qdoctor.kernels import reference
from qdoctor.kernels._support import as_rows, require, use_kernels
from qdoctor.kernels.act_quant import quantize_per_group, quantize_per_tensor, quantize_per_token

_IMPLS = ("auto", "tma", "ptr", "ws")
GROUP_SIZES = (32, 64, 128, 256)  # group sizes the Triton per-group GEMM tiles (powers of two dividing K)
WS_GROUP_SIZE = 128  # the warp-specialized Gluon per-group GEMM (sm90): g = 128 only


def _check_operands(q_x: torch.Tensor, q_w: torch.Tensor) -> None:
    require(q_x.dim() == 2 and q_x.dtype == torch.int8, f"q_x must be 2-D int8, got {q_x.dtype} {tuple(q_x.shape)}")
    require(q_w.dim() == 2 and q_w.dtype == torch.int8, f"q_w must be 2-D int8, got {q_w.dtype} {tuple(q_w.shape)}")
    require(q_x.shape[1] == q_w.shape[1], f"K mismatch: q_x {tuple(q_x.shape)}, q_w {tuple(q_w.shape)}")
    require(q_x.device == q_w.device, "q_x and q_w must be on the same device")


def _act_mode(s_x: torch.Tensor, m: int, groups: int | None) -> int:
    from qdoctor.kernels._triton_gemm import ACT_GROUP, ACT_TENSOR, ACT_TOKEN

    if s_x.numel() == 1 and s_x.dim() <= 1:  # per-tensor (for M = 1 the same as per-token)
        return ACT_TENSOR
    if s_x.dim() == 2:
        require(groups is not None and tuple(s_x.shape) == (m, groups),
                f"per-group activation scales must be (M, K/g) = ({m}, {groups}), got {tuple(s_x.shape)}")
        return ACT_GROUP
    require(s_x.shape == (m,), f"activation scales must be (M,) = ({m},) or a scalar, got {tuple(s_x.shape)}")
    return ACT_TOKEN


def _check_impl(impl: str, grouped: bool) -> None:
    require(impl in _IMPLS, f"impl must be one of {_IMPLS}, got {impl!r}")
    require(grouped or impl != "ws", "impl='ws' (the warp-specialized Gluon kernel) is for per-group weights only")


def _use_tma(impl: str):
    return None if impl in ("auto", "ws") else impl == "tma"


@functools.cache
def _gluon_importable() -> bool:
    try:
        import qdoctor.kernels._gluon_group_gemm  # noqa: F401
    except Exception:  # noqa: BLE001 - no Gluon, or a Triton without its Hopper API
        return False
    return True


def _ws_unsupported(q_x: torch.Tensor, q_w: torch.Tensor, group_size: int, act_mode: int) -> str | None:
    """Why the warp-specialized per-group kernel cannot take this call (None: it can)."""
    from qdoctor.kernels import _triton_gemm

    if group_size != WS_GROUP_SIZE:
        return f"it needs group size {WS_GROUP_SIZE}, got {group_size}"
    if act_mode == _triton_gemm.ACT_GROUP:
        return "it takes per-token or per-tensor activation scales, not per-group"
    if _triton_gemm._capability(_triton_gemm._device_index(q_x))[0] != 9:
        return "it needs a Hopper GPU (sm90: wgmma and TMA)"
    if not _triton_gemm.tma_supported(q_x, q_w, group_size):
        return "TMA needs unit K stride and 16-byte aligned bases and row strides"
    if not _gluon_importable():
        return "this Triton has no Gluon Hopper API (Triton ≥ 3.6 needed)"
    return None


def int8_mm(q_x: torch.Tensor, q_w: torch.Tensor, *, impl: str = "auto", autotune: bool = False) -> torch.Tensor:
    """acc = q_x · q_wᵀ with int32 accumulation (exact). q_x (M, K), q_w (N, K) int8 → (M, N) int32.

    Unlike ``torch._int_mm`` it takes the weight in its (N, K) layout and any M ≥ 1."""
    _check_operands(q_x, q_w)
    _check_impl(impl, grouped=False)
    if not use_kernels(q_x):
        return reference.reference_int8_mm(q_x, q_w)
    from qdoctor.kernels import _triton_gemm

    s = torch.ones(1, device=q_x.device)
    return _triton_gemm.gemm(q_x, s, q_w, s.expand(q_w.shape[0]), out_dtype=None, use_tma=_use_tma(impl),
                             autotune=autotune)


def int8_gemm(q_x: torch.Tensor, s_x: torch.Tensor, q_w: torch.Tensor, s_w: torch.Tensor, *,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, impl: str = "auto",
              autotune: bool = False) -> torch.Tensor:
    """Per-channel W8A8 GEMM: y[t, n] = (Σ_k q_x[t, k] q_w[n, k]) · s_x[t] · s_w[n] (+ b[n]).

    q_x (M, K) int8; s_x (M,) fp32 per-token, or a 1-element tensor per-tensor; q_w (N, K)
    int8; s_w (N,) fp32; bias (N,) or None. Returns (M, N) in ``out_dtype``.
    ``impl``: "tma" (Hopper TMA loads), "ptr" (pointer loads, any CUDA GPU) or "auto".
    ``autotune`` benchmarks the candidate tile configs on first use of each shape class."""
    _check_operands(q_x, q_w)
    _check_impl(impl, grouped=False)
    m, n = q_x.shape[0], q_w.shape[0]
    require(s_w.numel() == n, f"s_w must hold N = {n} per-channel scales, got {tuple(s_w.shape)}")
    if not use_kernels(q_x):
        return reference.reference_int8_gemm(q_x, s_x, q_w, s_w, bias, out_dtype)
    from qdoctor.kernels import _triton_gemm

    return _triton_gemm.gemm(q_x, s_x.float(), q_w, s_w.float().reshape(n), bias=bias, out_dtype=out_dtype,
                             act_mode=_act_mode(s_x, m, None), use_tma=_use_tma(impl), autotune=autotune)


def int8_gemm_grouped(q_x: torch.Tensor, s_x: torch.Tensor, q_w: torch.Tensor, s_w: torch.Tensor, group_size: int,
                      *, bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                      impl: str = "auto", autotune: bool = False) -> torch.Tensor:
    """Per-group W8A8 GEMM (groups of g = ``group_size`` along K):

        y[t, n] = s_x[t] · Σ_j s_w[n, j] · (Σ_{k in group j} q_x[t, k] q_w[n, k])  (+ b[n])

    with int32 partial sums per group, scaled and accumulated in fp32. s_w is (N, K/g); s_x
    is (M,) per-token, 1-element per-tensor, or (M, K/g) per-group (then s_x[t, j] is inside
    the sum). g must be a power of two in [32, 256] dividing K. For the fastest scale loads
    store s_w as the transpose of a contiguous (K/g, N) tensor (any strides work).

    ``impl``: "auto" takes the warp-specialized Gluon kernel ("ws": Hopper, g = 128, per-token
    or per-tensor activations) where it can run and the Triton kernel otherwise ("tma" or
    "ptr" loads); ``autotune`` applies to the Triton kernel."""
    _check_operands(q_x, q_w)
    m, (n, k) = q_x.shape[0], q_w.shape
    require(group_size in GROUP_SIZES and k % group_size == 0,
            f"group size must be 32, 64, 128 or 256 and divide K = {k}, got {group_size}")
    groups = k // group_size
    require(tuple(s_w.shape) == (n, groups), f"s_w must be (N, K/g) = ({n}, {groups}), got {tuple(s_w.shape)}")
    _check_impl(impl, grouped=True)
    if not use_kernels(q_x):
        return reference.reference_int8_gemm_grouped(q_x, s_x, q_w, s_w, group_size, bias, out_dtype)
    from qdoctor.kernels import _triton_gemm

    act_mode = _act_mode(s_x, m, groups)
    if impl in ("auto", "ws"):
        why_not = _ws_unsupported(q_x, q_w, group_size, act_mode)
        require(impl == "auto" or why_not is None, f"impl='ws' cannot run this call: {why_not}")
        if why_not is None:
            from qdoctor.kernels import _gluon_group_gemm as ws

            if impl == "ws" or ws.preferred(m, n, _triton_gemm._num_sms(_triton_gemm._device_index(q_x))):
                return ws.gemm(q_x, s_x.float(), q_w, s_w.float(), bias=bias, out_dtype=out_dtype, act_mode=act_mode)
    return _triton_gemm.gemm(q_x, s_x.float(), q_w, s_w.float(), bias=bias, out_dtype=out_dtype,
                             act_mode=act_mode, group_size=group_size, use_tma=_use_tma(impl), autotune=autotune)


def w8a8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, *, act: str = "token", act_scale=None,
                group_size: int | None = None, bias: torch.Tensor | None = None, impl: str = "auto",
                autotune: bool = False) -> torch.Tensor:
    """INT8 W8A8 linear layer: quantize x, multiply by the INT8 weight, dequantize, add bias.

        y[t, n] = (Σ_k q_x[t, k] q_w[n, k]) · s_x[t] · s_w[n] + b[n]                (per-channel)
        y[t, n] = s_x[t] · Σ_j s_w[n, j] (Σ_{k in group j} q_x[t, k] q_w[n, k]) + b[n]  (per-group)

    x (..., K) bf16/fp16/fp32; w_q (N, K) int8; w_scale (N,) per-channel or (N, K/g) with
    ``group_size`` = g; act: "token" (s_x[t] = absmax_k |x[t, k]| / 127, dynamic), "tensor"
    (static: s_x = ``act_scale``, a calibrated scalar) or "group" (s_x[t, j] per token and
    group, dynamic; needs ``group_size``); bias (N,) or None. Returns (..., N) in x.dtype.

    Same numbers as ``reference.reference_w8a8_linear`` up to fp32 rounding of the scaling
    (the integer sums are exact in both); on CPU it *is* the reference."""
    reference.check_linear_args(x, w_q, w_scale, act, act_scale, group_size, bias)
    _check_impl(impl, grouped=group_size is not None)
    if not use_kernels(x):
        return reference.reference_w8a8_linear(x, w_q, w_scale, act=act, act_scale=act_scale,
                                               group_size=group_size, bias=bias)
    x2 = as_rows(x)
    if act == "token":
        q_x, s_x = quantize_per_token(x2)
    elif act == "tensor":
        s_x = torch.as_tensor(act_scale, dtype=torch.float32, device=x.device).reshape(1)
        q_x = quantize_per_tensor(x2, s_x)
    else:
        q_x, s_x = quantize_per_group(x2, group_size)
    if group_size is None:
        y = int8_gemm(q_x, s_x, w_q, w_scale, bias=bias, out_dtype=x.dtype, impl=impl, autotune=autotune)
    else:
        y = int8_gemm_grouped(q_x, s_x, w_q, w_scale, group_size, bias=bias, out_dtype=x.dtype, impl=impl,
                              autotune=autotune)
    return y.reshape(*x.shape[:-1], w_q.shape[0])
