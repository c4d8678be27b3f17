"""FP8 E4M3 W8A8 linear layer through ``torch._scaled_mm`` with row-wise scales.

    y[t, n] = (Σ_k q_x[t, k] q_w[n, k]) · s_x[t] · s_w[n]  (+ b[n])

q_x = e4m3(clamp(x / s_x, ±448)) with s_x[t] = absmax_k |x[t, k]| / 448 (per-token, fused
Triton pass) or a calibrated per-tensor s_x; q_w (N, K) float8_e4m3fn with per-channel
s_w[n] = absmax_k |w[n, k]| / 448 (``reference.quantize_weight_fp8``). The GEMM is cuBLASLt/
CUTLASS's row-wise scaled FP8 kernel (sm89+); it accumulates in fp32 unless ``fast_accum``
(Hopper's faster, less precise FP8 accumulation) is asked for. The row-wise kernel writes
bf16, so other activation dtypes get a bf16 result cast to their dtype.
"""

from __future__ import annotations

import torch

from qdoctor.kernels import reference
from qdoctor.kernels._support import as_rows, require, use_kernels
from qdoctor.kernels.act_quant import quantize_per_tensor_fp8, quantize_per_token_fp8


def fp8_gemm(q_x: torch.Tensor, s_x: torch.Tensor, q_w: torch.Tensor, s_w: torch.Tensor, *,
             bias: torch.Tensor | None = None, fast_accum: bool = False) -> torch.Tensor:
    """y = (q_x · q_wᵀ) · s_x[t] · s_w[n] (+ b) in bf16. q_x (M, K), q_w (N, K) float8_e4m3fn;
    s_x (M,) (or one per-tensor value), s_w (N,) fp32. K and N must be multiples of 16."""
    m, k = q_x.shape
    n = q_w.shape[0]
    require(k % 16 == 0 and n % 16 == 0, f"torch._scaled_mm needs K and N divisible by 16, got K={k}, N={n}")
    scale_a = s_x.float().reshape(-1, 1).expand(m, 1).contiguous()
    scale_b = s_w.float().reshape(1, n).contiguous()
    return torch._scaled_mm(q_x, q_w.t(), scale_a=scale_a, scale_b=scale_b,
                            bias=bias.to(torch.bfloat16) if bias is not None else None,
                            out_dtype=torch.bfloat16, use_fast_accum=fast_accum)


def fp8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, *, act: str = "token", act_scale=None,
               bias: torch.Tensor | None = None, fast_accum: bool = False) -> torch.Tensor:
    """FP8 W8A8 linear layer (module docstring). x (..., K) float; w_q (N, K) float8_e4m3fn;
    w_scale (N,) fp32; act "token" (dynamic) or "tensor" (static, ``act_scale``); bias (N,).
    Returns (..., N) in x.dtype. On CPU it is ``reference.reference_fp8_linear``."""
    reference.check_linear_args(x, w_q, w_scale, act, act_scale, None, bias, weight_dtype=reference.FP8_DTYPE)
    require(act in ("token", "tensor"), f"FP8 supports act='token' or 'tensor', got {act!r}")
    if not use_kernels(x):
        return reference.reference_fp8_linear(x, w_q, w_scale, act=act, act_scale=act_scale, bias=bias)
    x2 = as_rows(x)
    if act == "token":
        q_x, s_x = quantize_per_token_fp8(x2)
    else:
        s_x = torch.as_tensor(act_scale, dtype=torch.float32, device=x.device).reshape(1)
        q_x = quantize_per_tensor_fp8(x2, s_x)
    y = fp8_gemm(q_x, s_x, w_q, w_scale, bias=bias, fast_accum=fast_accum)
    return y.to(x.dtype).reshape(*x.shape[:-1], w_q.shape[0])
