"""W8A8 kernels: fused activation quantization, INT8 GEMMs with fused dequantization, FP8.

CUDA tensors go to Triton kernels (and ``torch._scaled_mm`` for FP8); anything else (CPU,
no Triton) computes the pure-torch reference of the same formula, so every function here
can be called anywhere. Importing this package never imports Triton.

    y[t, n] = (Σ_k q_x[t, k] q_w[n, k]) · s_x[t] · s_w[n] + b[n]          (per-channel)
    y[t, n] = s_x[t] · Σ_j s_w[n, j] (Σ_{k in group j} q_x[t, k] q_w[n, k]) + b[n]   (per-group)

See ``reference`` for the exact semantics and docs/kernels.md for speed and tolerances.
"""

from qdoctor.kernels._support import available
from qdoctor.kernels.act_quant import (
    quantize_per_group,
    quantize_per_tensor,
    quantize_per_tensor_fp8,
    quantize_per_token,
    quantize_per_token_fp8,
)
from qdoctor.kernels.fp8 import fp8_gemm, fp8_linear
from qdoctor.kernels.int8_gemm import GROUP_SIZES, int8_gemm, int8_gemm_grouped, int8_mm, w8a8_linear
from qdoctor.kernels.reference import (
    quantize_weight_fp8,
    quantize_weight_int8,
    reference_fp8_linear,
    reference_int8_gemm,
    reference_int8_gemm_grouped,
    reference_int8_mm,
    reference_w8a8_linear,
)

__all__ = [
    "available", "GROUP_SIZES",
    "quantize_per_token", "quantize_per_tensor", "quantize_per_group",
    "quantize_per_token_fp8", "quantize_per_tensor_fp8",
    "quantize_weight_int8", "quantize_weight_fp8",
    "int8_mm", "int8_gemm", "int8_gemm_grouped", "w8a8_linear",
    "fp8_gemm", "fp8_linear",
    "reference_int8_mm", "reference_int8_gemm", "reference_int8_gemm_grouped",
    "reference_w8a8_linear", "reference_fp8_linear",
]
