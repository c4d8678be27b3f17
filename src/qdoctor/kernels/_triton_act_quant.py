"""Triton kernel: symmetric row quantization of activations in one pass over memory.

Imported lazily (needs Triton); semantics are ``reference.quantize_rows_reference`` and
``reference.quantize_per_tensor_reference``, bit for bit: the scale is absmax / qmax with
IEEE division (``div_rn``; Triton's plain ``/`` is an approximate division), x / s is IEEE
too, and the rounding is half to even like ``torch.round``.

Rows of up to 8192 elements are held in registers: read once, written once (2 + 1 bytes
per bf16 element). Longer rows take two passes, the second re-reading the row from L2.
"""

import torch
import triton
import triton.language as tl

from qdoctor.kernels._support import next_power_of_2

ONE_PASS_MAX_K = 8192


@triton.jit
def _row_scale(absmax, QMAX: tl.constexpr):
    """s = absmax / qmax (IEEE), 1 where absmax is 0."""
    qmax = tl.full(absmax.shape, QMAX, tl.float32)
    return tl.where(absmax > 0.0, tl.math.div_rn(absmax, qmax), 1.0)


@triton.jit
def _quantize_tile(x, scale, QMAX: tl.constexpr, TO_FP8: tl.constexpr):
    """Codes of an fp32 tile x [R, C] with one scale per row (scale [R])."""
    v = tl.minimum(tl.maximum(tl.math.div_rn(x, tl.broadcast_to(scale[:, None], x.shape)), -QMAX), QMAX)
    if TO_FP8:
        return v.to(tl.float8e4nv)  # round to nearest even, like torch's cast
    else:
        # round_half_even(v) as an integer without the quarter-rate rint/F2I instructions:
        # adding 1.5·2²³ rounds v (|v| ≤ 127 ≪ 2²²) to an integer, half to even, and leaves
        # it in the low mantissa bits. (Clamping first is the same: ±127 are integers.)
        return ((v + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000).to(tl.int8)


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, s_ptr,
    M, K, stride_xm, stride_qm,
    QMAX: tl.constexpr, TO_FP8: tl.constexpr, STATIC: tl.constexpr, ONE_PASS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < M
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_qm
    cols = tl.arange(0, BLOCK_K)[None, :]
    if STATIC:
        scale = tl.load(s_ptr) + tl.zeros([BLOCK_R], dtype=tl.float32)
    if ONE_PASS:
        mask = row_mask[:, None] & (cols < K)
        x = tl.load(x_rows + cols, mask=mask, other=0.0).to(tl.float32)
        if not STATIC:
            scale = _row_scale(tl.max(tl.abs(x), axis=1), QMAX)
            tl.store(s_ptr + rows, scale, mask=row_mask)
        tl.store(q_rows + cols, _quantize_tile(x, scale, QMAX, TO_FP8), mask=mask)
    else:
        if not STATIC:
            running = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                mask = row_mask[:, None] & (k0 + cols < K)
                x = tl.load(x_rows + k0 + cols, mask=mask, other=0.0).to(tl.float32)
                running = tl.maximum(running, tl.abs(x))
            scale = _row_scale(tl.max(running, axis=1), QMAX)
            tl.store(s_ptr + rows, scale, mask=row_mask)
        for k0 in range(0, K, BLOCK_K):
            mask = row_mask[:, None] & (k0 + cols < K)
            x = tl.load(x_rows + k0 + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_rows + k0 + cols, _quantize_tile(x, scale, QMAX, TO_FP8), mask=mask)


def quantize_rows(x: torch.Tensor, *, fp8: bool, scale: torch.Tensor | None = None, launch: dict | None = None):
    """Quantize each row of the contiguous-row matrix x (M, K).

    scale None: dynamic, returns (q, s (M,) fp32). scale given (1-element fp32 tensor on
    x's device): static per-tensor, returns (q, scale). ``launch`` overrides the launch
    shape (keys one_pass, block_k, num_warps; for benchmarks)."""
    m, k = x.shape
    q = torch.empty((m, k), device=x.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    static = scale is not None
    s = scale if static else torch.empty(m, device=x.device, dtype=torch.float32)
    one_pass, block_k, num_warps = _launch_shape(k)
    if launch:
        one_pass = launch.get("one_pass", one_pass)
        block_k = launch.get("block_k", block_k)
        num_warps = launch.get("num_warps", num_warps)
    block_r = max(1, 2048 // block_k) if one_pass else 1  # short rows (e.g. groups of 128): many per program
    if m > 0:
        _quantize_rows_kernel[(triton.cdiv(m, block_r),)](
            x, q, s, m, k, x.stride(0), q.stride(0),
            QMAX=448.0 if fp8 else 127.0, TO_FP8=fp8, STATIC=static, ONE_PASS=one_pass,
            BLOCK_R=block_r, BLOCK_K=block_k, num_warps=num_warps,
        )
    return q, s


def _launch_shape(k: int) -> tuple[bool, int, int]:
    """(one pass?, BLOCK_K, warps) for rows of k elements.

    Measured on an H100 (bench/gemm.py --quant-sweep, bf16, 8192 rows): one pass with 4-8
    warps reaches 2.5-2.7 TB/s up to 8192 elements; longer rows held whole in registers
    leave too few rows in flight (2.0 TB/s at 14336), and two passes with 4096-8192
    element blocks do better (2.4-2.5 TB/s at 14336 and 28672)."""
    block_k = next_power_of_2(max(k, 16))
    if block_k <= ONE_PASS_MAX_K:
        return True, block_k, min(8, max(4, block_k // 1024))
    return (False, 4096, 8) if k <= 16384 else (False, 8192, 16)
