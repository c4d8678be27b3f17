"""Gluon kernel: warp-specialized per-group(128) INT8 GEMM for Hopper (sm90).

Imported lazily (needs Triton ≥ 3.6 with Gluon). Computes the same formula as the Triton
per-group path,

    y[t, n] = s_x[t] · Σ_j s_w[n, j] · acc_j[t, n]  (+ b[n]),   acc_j = Σ_{k in group j} q_x[t, k] q_w[n, k],

with three changes that make it faster (docs/kernels.md has the measurements):

1. **Warp specialization.** One producer warp issues the TMA loads into a STAGES-deep ring;
   NUM_CONSUMERS = 3 consumer warpgroups each own 64 output channels of a 192-channel tile and
   run their own K loop: wgmma of one group (int32), release the stage, convert and scale-add
   into fp32. The consumers are not kept in lockstep, so one warpgroup's conversion and scaling
   (CUDA cores) runs while another's wgmma occupies the tensor cores. In a plain Triton kernel
   the int32 wgmma is waited for before the scaling and all warps move together, so the two
   units take turns (H200, M = 8192, x quantization included: 0.86–1.09× BF16 for the Triton
   kernel, 1.03–1.28× for this one).
2. **Transposed tiles.** Each consumer computes a tile of yᵀ (rows = channels n, columns =
   tokens t), so the per-group weight scale s_w[n, j] is per *row* of the wgmma accumulator: a
   thread needs 2 scale values per group instead of 32 (per column), which took as many load
   instructions as the multiply-adds themselves.
3. **Register budget.** Each consumer holds one int32 group partial and one fp32 accumulator
   (64 + 64 registers per thread); the ring buffers' "empty" barrier counts one arrival per
   consumer. No wgmma accumulator is live across a loop back edge while in flight (ptxas would
   serialize every wgmma of the kernel, warning C7514).

Persistent: one CTA per SM walks the tiles in grouped order (GROUP_N channel tiles share the
token tiles in L2).
"""

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from qdoctor.kernels._triton_gemm import ACT_TOKEN, _device_index, _num_sms
from qdoctor.kernels.int8_gemm import WS_GROUP_SIZE as GROUP_SIZE  # BLOCK_K: one group per K step
CHANNELS_PER_CONSUMER = 64  # rows of one consumer's wgmma tile (the instruction's M)
NUM_CONSUMERS = 3
STAGES = 5
GROUP_N = 8
MAX_REGS = 128  # launch limit per thread: (3 consumer + 1 producer warpgroups) · 128 threads · 128 = 64 K
CONSUMER_REGS = 152  # after setmaxnreg: 3 · 128 · 152 + 128 · 40 ≤ 65536
PRODUCER_REGS = 40
_PER_TOKEN = gl.constexpr(ACT_TOKEN)  # a global read inside a kernel must be a constexpr

_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


@gluon.jit
def _tile_offsets(tile_id, num_pid_n, num_pid_t, BLOCK_N: gl.constexpr, BLOCK_T: gl.constexpr,
                  GROUP_N: gl.constexpr):
    """(first channel, first token) of a tile in grouped order (``_triton_gemm._tile_coords``
    in Gluon, whose kernels cannot call Triton-language functions)."""
    first = (tile_id // (GROUP_N * num_pid_t)) * GROUP_N
    group_size = gl.minimum(num_pid_n - first, GROUP_N)
    off_n = (first + (tile_id % group_size)) * BLOCK_N
    off_t = ((tile_id % (GROUP_N * num_pid_t)) // group_size) * BLOCK_T
    return off_n, off_t


@gluon.jit
def _consumer(w_bufs, x_bufs, ready, empty, c_ptr, sx_ptr, sw_ptr, bias_ptr, M, N, k_tiles,
              stride_cm, stride_cn, stride_sxm, stride_swn, stride_swg,
              WG: gl.constexpr, ACT_MODE: gl.constexpr, HAS_BIAS: gl.constexpr, HALF_N: gl.constexpr,
              BLOCK_T: gl.constexpr, NC: gl.constexpr, STAGES: gl.constexpr, GROUP_N: gl.constexpr):
    """Channels [off_n + WG·64, +64) of every tile: acc[n, t] = Σ_j s_w[n, j] · (w_j x_jᵀ)[n, t]."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, BLOCK_T, 32])
    rows: gl.constexpr = gl.SliceLayout(1, mma)
    cols: gl.constexpr = gl.SliceLayout(0, mma)
    num_pid_n = gl.cdiv(N, NC * HALF_N)
    num_pid_t = gl.cdiv(M, BLOCK_T)
    part = gl.zeros([HALF_N, BLOCK_T], gl.int32, mma)  # reused in place: use_acc=False ignores its value
    it = 0
    for tile_id in range(gl.program_id(0), num_pid_n * num_pid_t, gl.num_programs(0)):
        off_n, off_t = _tile_offsets(tile_id, num_pid_n, num_pid_t, NC * HALF_N, BLOCK_T, GROUP_N)
        offs_n = off_n + WG * HALF_N + gl.arange(0, HALF_N, layout=rows)
        mask_n = offs_n < N
        sw_ptrs = sw_ptr + gl.where(mask_n, offs_n, 0) * stride_swn
        acc = gl.zeros([HALF_N, BLOCK_T], gl.float32, mma)
        for kk in range(k_tiles):
            s = it % STAGES
            scale = gl.expand_dims(gl.load(sw_ptrs + kk * stride_swg), 1)  # in flight during the MMA
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            part = warpgroup_mma(w_bufs.index(s), x_bufs.index(s).permute((1, 0)), part, use_acc=False,
                                 is_async=True)
            part = warpgroup_mma_wait(num_outstanding=0, deps=(part,))
            mbarrier.arrive(empty.index(s), count=1)
            acc = gl.fma(part.to(gl.float32), scale, acc)  # |part| ≤ 128·127² < 2²⁴: exact conversion
            it += 1
        offs_t = off_t + gl.arange(0, BLOCK_T, layout=cols)
        mask_t = offs_t < M
        if ACT_MODE == _PER_TOKEN:
            acc = acc * gl.expand_dims(gl.load(sx_ptr + offs_t * stride_sxm, mask=mask_t, other=0.0), 0)
        else:
            acc = acc * gl.load(sx_ptr)
        if HAS_BIAS:
            acc = acc + gl.expand_dims(gl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(gl.float32), 1)
        ptrs = (c_ptr + gl.expand_dims(offs_t.to(gl.int64) * stride_cm, 0)
                + gl.expand_dims(offs_n * stride_cn, 1))
        gl.store(ptrs, acc.to(c_ptr.dtype.element_ty), mask=gl.expand_dims(mask_n, 1) & gl.expand_dims(mask_t, 0))


@gluon.jit
def _producer(w_desc, x_desc, w0_bufs, w1_bufs, w2_bufs, x_bufs, ready, empty, M, N, k_tiles,
              NC: gl.constexpr, STAGES: gl.constexpr, GROUP_N: gl.constexpr):
    """TMA loads of each K step: NC 64-channel weight boxes and one token box into the ring."""
    HALF_N: gl.constexpr = w_desc.block_type.shape[0]
    BLOCK_T: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = w_desc.block_type.shape[1]
    nbytes: gl.constexpr = NC * w_desc.block_type.nbytes + x_desc.block_type.nbytes
    num_pid_n = gl.cdiv(N, NC * HALF_N)
    num_pid_t = gl.cdiv(M, BLOCK_T)
    it = 0
    for tile_id in range(gl.program_id(0), num_pid_n * num_pid_t, gl.num_programs(0)):
        off_n, off_t = _tile_offsets(tile_id, num_pid_n, num_pid_t, NC * HALF_N, BLOCK_T, GROUP_N)
        for kk in range(k_tiles):
            s = it % STAGES
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)  # fresh barriers pass phase 1
            mbarrier.expect(ready.index(s), nbytes)
            _tma_load(w_desc, [off_n, kk * BLOCK_K], ready.index(s), w0_bufs.index(s))
            _tma_load(w_desc, [off_n + HALF_N, kk * BLOCK_K], ready.index(s), w1_bufs.index(s))
            _tma_load(w_desc, [off_n + 2 * HALF_N, kk * BLOCK_K], ready.index(s), w2_bufs.index(s))
            _tma_load(x_desc, [off_t, kk * BLOCK_K], ready.index(s), x_bufs.index(s))
            it += 1


@gluon.jit
def _group_gemm_ws_kernel(w_desc, x_desc, c_ptr, sx_ptr, sw_ptr, bias_ptr, M, N, K,
                          stride_cm, stride_cn, stride_sxm, stride_swn, stride_swg,
                          ACT_MODE: gl.constexpr, HAS_BIAS: gl.constexpr, STAGES: gl.constexpr,
                          GROUP_N: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                          num_warps: gl.constexpr):
    HALF_N: gl.constexpr = w_desc.block_type.shape[0]
    BLOCK_T: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = w_desc.block_type.shape[1]
    NC: gl.constexpr = 3  # = NUM_CONSUMERS: three consumer partitions and three weight boxes below
    w0_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, HALF_N, BLOCK_K], w_desc.layout)
    w1_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, HALF_N, BLOCK_K], w_desc.layout)
    w2_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, HALF_N, BLOCK_K], w_desc.layout)
    x_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_T, BLOCK_K], x_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=NC)
    k_tiles = gl.cdiv(K, BLOCK_K)
    gl.warp_specialize([
        (_consumer, (w0_bufs, x_bufs, ready, empty, c_ptr, sx_ptr, sw_ptr, bias_ptr, M, N, k_tiles, stride_cm,
                     stride_cn, stride_sxm, stride_swn, stride_swg, 0, ACT_MODE, HAS_BIAS, HALF_N, BLOCK_T, NC,
                     STAGES, GROUP_N)),
        (_consumer, (w1_bufs, x_bufs, ready, empty, c_ptr, sx_ptr, sw_ptr, bias_ptr, M, N, k_tiles, stride_cm,
                     stride_cn, stride_sxm, stride_swn, stride_swg, 1, ACT_MODE, HAS_BIAS, HALF_N, BLOCK_T, NC,
                     STAGES, GROUP_N)),
        (_consumer, (w2_bufs, x_bufs, ready, empty, c_ptr, sx_ptr, sw_ptr, bias_ptr, M, N, k_tiles, stride_cm,
                     stride_cn, stride_sxm, stride_swn, stride_swg, 2, ACT_MODE, HAS_BIAS, HALF_N, BLOCK_T, NC,
                     STAGES, GROUP_N)),
        (_producer, (w_desc, x_desc, w0_bufs, w1_bufs, w2_bufs, x_bufs, ready, empty, M, N, k_tiles, NC, STAGES,
                     GROUP_N)),
    ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])


def preferred(m: int, n: int, num_sms: int) -> bool:
    """Whether "auto" should take this kernel over the Triton one. Measured on an H200
    (bench/gemm.py, Llama shapes): it wins at M ≤ 64 (the wgmma tile shrinks with M) and
    wherever the grid has ≥ ¾ as many tiles as SMs; below that (e.g. M = 256 with N ≤ 8192)
    its 192-channel tiles leave SMs idle and the Triton kernel's smaller tiles are faster."""
    return m <= 64 or 4 * _num_tiles(m, n) >= 3 * num_sms


def token_block(m: int) -> int:
    """Tokens per tile (the wgmma N): 128, or the next power of two ≥ max(M, 16) for short M."""
    return min(128, max(16, triton.next_power_of_2(m)))


def _num_tiles(m: int, n: int) -> int:
    """Output tiles of 192 channels × token_block(M) tokens."""
    return triton.cdiv(n, NUM_CONSUMERS * CHANNELS_PER_CONSUMER) * triton.cdiv(m, token_block(m))


def gemm(q_x, s_x, q_w, s_w, *, bias=None, out_dtype=torch.bfloat16, act_mode=ACT_TOKEN):
    """Launch the warp-specialized per-group(128) GEMM. The caller checked eligibility
    (``int8_gemm._ws_unsupported``): sm90, TMA-compatible int8 operands, K % 128 == 0, act per-token/per-tensor.

    q_x (M, K) int8, s_x (M,) or (1,) fp32, q_w (N, K) int8, s_w (N, K/128) fp32 (any strides),
    bias (N,) or None → y (M, N) in ``out_dtype``."""
    m, k = q_x.shape
    n = q_w.shape[0]
    out = torch.empty((m, n), device=q_x.device, dtype=out_dtype)
    if m == 0 or n == 0:
        return out
    block_t = token_block(m)
    w_layout = gl.NVMMASharedLayout.get_default_for([CHANNELS_PER_CONSUMER, GROUP_SIZE], gl.int8)
    x_layout = gl.NVMMASharedLayout.get_default_for([block_t, GROUP_SIZE], gl.int8)
    w_desc = TensorDescriptor.from_tensor(q_w, [CHANNELS_PER_CONSUMER, GROUP_SIZE], w_layout)
    x_desc = TensorDescriptor.from_tensor(q_x, [block_t, GROUP_SIZE], x_layout)
    grid = (min(_num_tiles(m, n), _num_sms(_device_index(q_x))),)
    with torch.cuda.device(q_x.device):
        _group_gemm_ws_kernel[grid](
            w_desc, x_desc, out, s_x, s_w, bias if bias is not None else s_x, m, n, k,
            out.stride(0), out.stride(1), s_x.stride(0) if act_mode == ACT_TOKEN else 0, s_w.stride(0),
            s_w.stride(1), ACT_MODE=act_mode, HAS_BIAS=bias is not None, STAGES=STAGES, GROUP_N=GROUP_N,
            CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS, num_warps=4, maxnreg=MAX_REGS)
    return out
