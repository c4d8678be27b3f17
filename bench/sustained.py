"""Sustained W8A8 throughput under the GPU's power cap, with SM clock and power (a benchmark).

    python bench/sustained.py [--m 8192 --n 28672 --k 8192] [--seconds 4]

bench/gemm.py times short bursts (tens of milliseconds per method, L2 flushed), where the GPU
still runs near its boost clock. A serving GPU runs the same kernels back to back for minutes
and sits at its power limit, where each kernel gets the clock its power draw allows. This
script runs each method back to back for ``--seconds`` (after 2 s idle), reads the SM clock
and board power from ``nvidia-smi`` every 100 ms, and prints throughput (x quantization
included), the ratio to BF16 and the median clock and power over the last two thirds of the
run. Same inputs as bench/gemm.py (random normal x, weights 0.02·N(0, 1)).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def median(values):
    values = sorted(values)
    return values[len(values) // 2] if values else float("nan")


def sustained(fn, seconds: float):
    """(ms per call, median SM MHz, median W) of fn run back to back for ``seconds``."""
    fn()
    torch.cuda.synchronize()
    time.sleep(2)  # start every method from the same idle state
    monitor = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                                "-lms", "100"], stdout=subprocess.PIPE, text=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    calls, t0 = 0, time.time()
    start.record()
    while time.time() - t0 < seconds:
        for _ in range(20):
            fn()
        calls += 20
        torch.cuda.synchronize()
    end.record()
    torch.cuda.synchronize()
    monitor.terminate()
    samples = [line.split(",") for line in monitor.communicate()[0].splitlines() if line.count(",") == 1]
    samples = [(float(c), float(p)) for c, p in samples][len(samples) // 3:]  # drop the ramp-up
    return start.elapsed_time(end) / calls, median(s[0] for s in samples), median(s[1] for s in samples)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--n", type=int, default=28672)
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/sustained.py needs a CUDA GPU")
    import qdoctor.kernels as K

    m, n, k = args.m, args.n, args.k
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    q_w, s_w = K.quantize_weight_int8(w.float())
    q_wg, s_wg = K.quantize_weight_int8(w.float(), group_size=128)
    s_wg = s_wg.t().contiguous().t()
    q_wf, s_wf = K.quantize_weight_fp8(w.float())
    methods = {
        "bf16": lambda: F.linear(x, w),
        "int8 per-channel": lambda: K.w8a8_linear(x, q_w, s_w, autotune=True),
        "int8 g128 (auto)": lambda: K.w8a8_linear(x, q_wg, s_wg, group_size=128, autotune=True),
        "int8 g128 triton": lambda: K.w8a8_linear(x, q_wg, s_wg, group_size=128, impl="tma", autotune=True),
        "fp8 row-wise": lambda: K.fp8_linear(x, q_wf, s_wf),
    }
    print(f"# {torch.cuda.get_device_name()}, M={m} N={n} K={k}, {args.seconds:.0f} s each, x quantization included",
          flush=True)
    bf16_ms = None
    for name, fn in methods.items():
        ms, mhz, watts = sustained(fn, args.seconds)
        bf16_ms = bf16_ms or ms
        print(f"{name:18s} {2.0 * m * n * k / ms / 1e9:6.0f} TOP/s  {bf16_ms / ms:4.2f}× bf16  "
              f"SM {mhz:5.0f} MHz  {watts:4.0f} W", flush=True)


if __name__ == "__main__":
    main()
