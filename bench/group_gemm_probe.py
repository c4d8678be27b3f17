"""Where the per-group(128) INT8 GEMM loses its time on Hopper (a benchmark, never a test).

    python bench/group_gemm_probe.py [--m 8192 --n 28672 --k 8192]

Prints, in one run on one GPU, the throughput of stripped-down kernels that share the shipped
per-group kernel's pipeline (persistent, TMA loads, grouped tile order, BLOCK_K = 128) and differ
only in what each 128-wide K step does with its int32 MMA result, on fixed tile shapes, as
ratios to BF16 F.linear of the same shape:

  int32    acc = dot(a, b, acc) over all of K (the per-channel loop: the ceiling)
  convert  acc += float(dot(a, b))          (per-group bookkeeping without the scale)
  scaled   acc += float(dot(a, b)) * s_w[j] (the shipped per-group loop)
  gluon    the scaled loop written in Gluon with the next group's wgmma issued asynchronously
           and the previous group scaled underneath it (Triton itself keeps an int32 wgmma
           synchronous), three accumulator sets in registers

Each scaled output is checked against the float64 sum Σ_j s_w[n,j] · Σ_k q_x q_w · s_x[t] on a
corner of the output. Findings are in docs/kernels.md ("Design: Per-group on Hopper",
"Targets"); the kernel that came out of them is qdoctor/kernels/_gluon_group_gemm.py.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

VARIANTS = {"int32": 0, "convert": 1, "scaled": 2}


@triton.jit
def _probe_kernel(a, b, c_ptr, sx_ptr, sw_ptr, M, N, K, stride_swn, stride_swg,
                  VARIANT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr):
    start_pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile_id in tl.range(start_pid, num_pid_m * num_pid_n, num_progs, flatten=False):
        group_id = tile_id // (GROUP_M * num_pid_n)
        first_pid_m = group_id * GROUP_M
        group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + (tile_id % group_size_m)
        pid_n = (tile_id % (GROUP_M * num_pid_n)) // group_size_m
        offs_am = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_bn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if VARIANT == 0:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        s_w_next = tl.load(sw_ptr + offs_bn * stride_swn)
        for ki in range(k_tiles):
            ta = a.load([pid_m * BLOCK_M, ki * BLOCK_K])
            tb = b.load([pid_n * BLOCK_N, ki * BLOCK_K])
            if VARIANT == 0:
                acc = tl.dot(ta, tb.T, acc, out_dtype=tl.int32)
            else:
                s_w = s_w_next
                s_w_next = tl.load(sw_ptr + offs_bn * stride_swn + tl.minimum(ki + 1, k_tiles - 1) * stride_swg)
                part = tl.dot(ta, tb.T, out_dtype=tl.int32).to(tl.float32)
                if VARIANT == 1:
                    acc += part
                else:
                    acc += part * s_w[None, :]
        y = acc.to(tl.float32) * tl.load(sx_ptr + offs_am)[:, None]
        if VARIANT == 0:
            y = y * s_w_next[None, :]
        tl.store(c_ptr + offs_am[:, None] * N + offs_bn[None, :], y.to(c_ptr.dtype.element_ty))


def _gluon():
    """The Gluon kernel and its launcher, or None where Gluon (Triton ≥ 3.5, sm90) is missing."""
    try:
        from triton.experimental import gluon
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
    except ImportError:
        return None
    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

    @gluon.jit
    def kernel(a_desc, b_desc, c_ptr, sx_ptr, sw_ptr, M, N, K, stride_cm, stride_swn, stride_swg,
               STAGES: gl.constexpr, GROUP_M: gl.constexpr, INSTR_N: gl.constexpr, WARPS_M: gl.constexpr,
               WARPS_N: gl.constexpr, num_warps: gl.constexpr):
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS_M, WARPS_N],
                                                      instr_shape=[16, INSTR_N, 32])
        pid = gl.program_id(0)
        num_pid_m = gl.cdiv(M, BLOCK_M)
        num_pid_n = gl.cdiv(N, BLOCK_N)
        first_pid_m = (pid // (GROUP_M * num_pid_n)) * GROUP_M
        group_size_m = gl.minimum(num_pid_m - first_pid_m, GROUP_M)
        off_m = (first_pid_m + (pid % group_size_m)) * BLOCK_M
        off_n = ((pid % (GROUP_M * num_pid_n)) // group_size_m) * BLOCK_N
        a_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
        b_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        k_tiles = gl.cdiv(K, BLOCK_K)
        nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
        for i in gl.static_range(STAGES):
            mbarrier.expect(bars.index(i), nbytes, pred=i < k_tiles)
            tma_load(a_desc, [off_m, i * BLOCK_K], bars.index(i), a_bufs.index(i), pred=i < k_tiles)
            tma_load(b_desc, [off_n, i * BLOCK_K], bars.index(i), b_bufs.index(i), pred=i < k_tiles)
        # group scales: one register per thread, moved to the MMA layout when used
        flat: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        cols: gl.constexpr = gl.SliceLayout(0, mma)
        offs_f = off_n + gl.arange(0, BLOCK_N, layout=flat)
        sw_ptrs = sw_ptr + gl.where(offs_f < N, offs_f, 0) * stride_swn
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
        mbarrier.wait(bars.index(0), 0)
        part = warpgroup_mma(a_bufs.index(0), b_bufs.index(0).permute((1, 0)),
                             gl.zeros([BLOCK_M, BLOCK_N], gl.int32, mma), use_acc=False, is_async=True)
        s_next = gl.load(sw_ptrs)
        for ki in range(1, k_tiles):
            prev = warpgroup_mma_wait(num_outstanding=0, deps=(part,))
            ls = (ki - 1) % STAGES  # MMA ki-1 is done: its stage takes tile ki-1+STAGES
            p = ki - 1 + STAGES < k_tiles
            mbarrier.expect(bars.index(ls), nbytes, pred=p)
            tma_load(a_desc, [off_m, (ki - 1 + STAGES) * BLOCK_K], bars.index(ls), a_bufs.index(ls), pred=p)
            tma_load(b_desc, [off_n, (ki - 1 + STAGES) * BLOCK_K], bars.index(ls), b_bufs.index(ls), pred=p)
            s = ki % STAGES
            mbarrier.wait(bars.index(s), (ki // STAGES) & 1)
            part = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)),
                                 gl.zeros([BLOCK_M, BLOCK_N], gl.int32, mma), use_acc=False, is_async=True)
            s_use = gl.convert_layout(s_next, cols)  # group ki-1, scaled while MMA ki runs
            s_next = gl.load(sw_ptrs + ki * stride_swg)
            acc += prev.to(gl.float32) * gl.expand_dims(s_use, 0)
        last = warpgroup_mma_wait(num_outstanding=0, deps=(part,))
        acc += last.to(gl.float32) * gl.expand_dims(gl.convert_layout(s_next, cols), 0)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))
        offs_m = gl.expand_dims(off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma)), 1)
        offs_n = gl.expand_dims(off_n + gl.arange(0, BLOCK_N, layout=cols), 0)
        y = acc * gl.load(sx_ptr + offs_m, mask=offs_m < M, other=0.0)
        gl.store(c_ptr + offs_m * stride_cm + offs_n, y.to(c_ptr.dtype.element_ty), mask=(offs_m < M) & (offs_n < N))

    def launch(qx, sx, qw, sw, out, bm, bn, warps, stages):
        a = GluonDescriptor.from_tensor(qx, [bm, 128], gl.NVMMASharedLayout.get_default_for([bm, 128], gl.int8))
        b = GluonDescriptor.from_tensor(qw, [bn, 128], gl.NVMMASharedLayout.get_default_for([bn, 128], gl.int8))
        warps_m = min(warps, bm // 16)
        instr_n = bn // (warps // warps_m)
        while instr_n > 224:
            instr_n //= 2
        grid = (triton.cdiv(qx.shape[0], bm) * triton.cdiv(qw.shape[0], bn),)
        kernel[grid](a, b, out, sx, sw, qx.shape[0], qw.shape[0], qx.shape[1], out.stride(0), sw.stride(0),
                     sw.stride(1), STAGES=stages, GROUP_M=8, INSTR_N=instr_n, WARPS_M=warps_m,
                     WARPS_N=warps // warps_m, num_warps=warps)

    return launch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--n", type=int, default=28672)
    ap.add_argument("--k", type=int, default=8192)
    args = ap.parse_args(argv)
    m, n, k = args.m, args.n, args.k
    if not torch.cuda.is_available() or m % 128 or n % 256 or k % 128:
        raise SystemExit("needs a CUDA GPU (sm90) and M % 128 = N % 256 = K % 128 = 0")
    g = torch.Generator(device="cuda").manual_seed(0)
    qx = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8, generator=g)
    qw = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8, generator=g)
    sx = torch.rand(m, device="cuda", generator=g) * 1e-2
    sw = (torch.rand(k // 128, n, device="cuda", generator=g) * 1e-3).T  # (N, K/g) view, contiguous along N
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    xs, ws = qx[:128].double().view(128, -1, 128), qw[:128].double().view(128, -1, 128)
    exact = torch.einsum("tjk,njk,nj->tn", xs, ws, sw[:128].double()) * sx[:128].double()[:, None]
    xb = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    flops = 2.0 * m * n * k
    bf = triton.testing.do_bench(lambda: torch.nn.functional.linear(xb, wb), warmup=25, rep=200)
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}; M={m} N={n} K={k}; "
          f"bf16 {flops / bf / 1e9:.0f} TFLOP/s", flush=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    # (BLOCK_M, BLOCK_N, stages, warps, CTAs per SM)
    for bm, bn, stages, warps, occ in [(64, 256, 3, 8, 1), (128, 128, 4, 8, 1), (64, 128, 4, 4, 2), (128, 256, 3, 8, 1)]:
        a = TensorDescriptor.from_tensor(qx, [bm, 128])
        b = TensorDescriptor.from_tensor(qw, [bn, 128])
        grid = (min(sms * occ, (m // bm) * (n // bn)),)
        for name, variant in VARIANTS.items():
            def run():
                return _probe_kernel[grid](a, b, out, sx, sw, m, n, k, sw.stride(0), sw.stride(1), VARIANT=variant,
                                           BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8, num_warps=warps,
                                           num_stages=stages)
            ck = run()
            torch.cuda.synchronize()
            note = ""
            if name == "scaled":
                err = float((out[:128, :128].double() - exact).norm() / exact.norm())
                note = f" rel err {err:.1e}"
            ms = triton.testing.do_bench(run, warmup=10, rep=100)
            print(f"{bm}x{bn} {warps} warps {occ} CTA/SM  {name:8s} {flops / ms / 1e9:6.0f} TOP/s  {bf / ms:.2f}x bf16"
                  f"  regs {ck.n_regs} spills {ck.n_spills}{note}", flush=True)
    launch = _gluon()
    if launch is None:
        print("gluon: not available in this Triton")
        return
    for bm, bn, warps, stages in [(128, 128, 8, 4), (64, 128, 4, 4), (128, 64, 4, 4), (64, 256, 8, 3)]:
        launch(qx, sx, qw, sw, out, bm, bn, warps, stages)
        torch.cuda.synchronize()
        err = float((out[:128, :128].double() - exact).norm() / exact.norm())
        ms = triton.testing.do_bench(lambda: launch(qx, sx, qw, sw, out, bm, bn, warps, stages), warmup=10, rep=100)
        print(f"{bm}x{bn} {warps} warps           gluon    {flops / ms / 1e9:6.0f} TOP/s  {bf / ms:.2f}x bf16"
              f"  rel err {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
