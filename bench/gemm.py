"""W8A8 GEMM throughput against BF16 on Llama-3 layer shapes (a benchmark, never a test).

    python bench/gemm.py [--models 8b,70b] [--m 16,256,2048,8192] [--json out.json]

For each layer shape (N, K) and token count M it times, in one run on one GPU:

  bf16       F.linear(x, w), cuBLAS BF16
  int_mm     quantize x (our per-token kernel) + torch._int_mm + eager dequant (needs M > 16)
  int8       qdoctor w8a8_linear per-token × per-channel: quantize x + fused-dequant GEMM
  int8 gemm  the fused GEMM alone (x already quantized)
  int8 g128  w8a8_linear per-token × per-group(128) weights, quantization of x included
             (impl "auto": the warp-specialized Gluon kernel on Hopper)
  g128 triton  the same through the Triton per-group kernel (impl "tma", autotuned)
  fp8        qdoctor fp8_linear: quantize x to E4M3 per token + torch._scaled_mm row-wise
  fp8 gemm   torch._scaled_mm row-wise alone
  fp8 fast   fp8_linear with use_fast_accum=True
  torchao    int8 dynamic activation × int8 weight linear, if torchao is importable

Throughput is 2·M·N·K / time (TFLOP/s; TOP/s for integer paths); ratios are against BF16
of the same shape in the same run. Time = median over repeats of CUDA-event-timed runs
with the L2 cache flushed before each (triton.testing.do_bench), after warm-up, in two
modes: "graph" replays one call captured in a CUDA graph (GPU time, as a serving stack
with graphs sees it) and "eager" times a Python call (host launch overhead included,
which dominates at small M). The Triton GEMMs are autotuned on their first call (outside
the timing). Each output is checked against its own fp32 fake-quantized product (relative
error, in the JSON). Inputs are random normal (never zeros). 70B gate_up is one
projection (N = 28672); 8B gate_up is the fused gate+up projection (N = 2 · 14336).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {
    "8b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)],
    "70b": [("qkv", 10240, 8192), ("o", 8192, 8192), ("gate_up", 28672, 8192), ("down", 8192, 28672)],
}
METHODS = ["bf16", "int_mm", "int8", "int8 gemm", "int8 g128", "g128 triton", "fp8", "fp8 gemm", "fp8 fast",
           "torchao"]
GROUP = 128
# Targets from the issue (ratio vs BF16 at M = 8192, measured in the same run).
TARGETS = [
    ("int8 (incl. x quant) on 70B MLP", "int8", [("70b", "gate_up"), ("70b", "down")], 1.7),
    ("int8 (incl. x quant) on qkv/o", "int8", [(m, l) for m in SHAPES for l in ("qkv", "o")], 1.5),
    ("int8 per-group(128) incl. x quant", "int8 g128", [(m, l) for m in SHAPES for l, _, _ in SHAPES[m]], 1.4),
    ("fp8 row-wise incl. x quant", "fp8", [(m, l) for m in SHAPES for l, _, _ in SHAPES[m]], 1.6),
]


def log(*args):
    print(*args, flush=True)


def build_methods(x, w, m, n, k):
    """{name: callable} for one shape; every callable returns the layer output."""
    import qdoctor.kernels as K

    q_w, s_w = K.quantize_weight_int8(w.float())
    q_wg, s_wg = K.quantize_weight_int8(w.float(), group_size=GROUP)
    s_wg = s_wg.t().contiguous().t()  # (N, K/g) view of a (K/g, N) tensor: contiguous scale loads
    q_wf, s_wf = K.quantize_weight_fp8(w.float())
    q_x, s_x = K.quantize_per_token(x)
    q_xf, s_xf = K.quantize_per_token_fp8(x)

    def int_mm():
        q, s = K.quantize_per_token(x)
        acc = torch._int_mm(q, q_w.t())
        return (acc.float() * s[:, None] * s_w[None, :]).to(x.dtype)

    methods = {
        "bf16": lambda: F.linear(x, w),
        "int_mm": int_mm if m > 16 else None,
        "int8": lambda: K.w8a8_linear(x, q_w, s_w, autotune=True),
        "int8 gemm": lambda: K.int8_gemm(q_x, s_x, q_w, s_w, out_dtype=x.dtype, autotune=True),
        "int8 g128": lambda: K.w8a8_linear(x, q_wg, s_wg, group_size=GROUP, autotune=True),
        "g128 triton": lambda: K.w8a8_linear(x, q_wg, s_wg, group_size=GROUP, impl="tma", autotune=True),
        "fp8": lambda: K.fp8_linear(x, q_wf, s_wf),
        "fp8 gemm": lambda: K.fp8_gemm(q_xf, s_xf, q_wf, s_wf),
        "fp8 fast": lambda: K.fp8_linear(x, q_wf, s_wf, fast_accum=True),
        "torchao": torchao_linear(x, w),
    }
    # fp32 fake-quantized products: what each path must compute (up to rounding)
    s_g_full = s_wg.repeat_interleave(GROUP, dim=1)
    refs = {
        "int8": lambda: (q_x.float() * s_x[:, None]) @ (q_w.float() * s_w[:, None]).T,
        "int8 g128": lambda: (q_x.float() * s_x[:, None]) @ (q_wg.float() * s_g_full).T,
        "fp8": lambda: (q_xf.float() * s_xf[:, None]) @ (q_wf.float() * s_wf[:, None]).T,
        "bf16": lambda: x.float() @ w.float().T,
    }
    ref_of = {"int_mm": "int8", "int8 gemm": "int8", "g128 triton": "int8 g128", "fp8 gemm": "fp8", "fp8 fast": "fp8",
              "torchao": "bf16"}
    return methods, refs, ref_of


def torchao_linear(x, w):
    """torchao's int8 dynamic-activation × int8-weight linear, or None if torchao is absent."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except Exception:  # noqa: BLE001 - absent or incompatible: the column stays empty
        return None
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    quantize_(lin, Int8DynamicActivationInt8WeightConfig())
    return lambda: lin(x)


def time_ms(fn, warmup_ms, rep_ms):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def graphed(fn):
    """One call of fn captured in a CUDA graph (fn already warmed up and tuned)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def bench_shape(model, layer, n, k, m, args, gen):
    import qdoctor.kernels as K

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    methods, refs, ref_of = build_methods(x, w, m, n, k)
    if args.only:
        keep = {"bf16", *args.only.split(",")}
        methods = {name: fn for name, fn in methods.items() if name in keep}
    methods["x quant"] = lambda: K.quantize_per_token(x)
    row = {"model": model, "layer": layer, "M": m, "N": n, "K": k, "ms": {"graph": {}, "eager": {}},
           "tflops": {"graph": {}, "eager": {}}, "rel_err": {}}
    ready, ref_cache = {}, {}
    for name, fn in methods.items():
        if fn is None:
            continue
        try:
            t0 = time.time()
            y = fn()  # autotunes on first use of a shape class
            torch.cuda.synchronize()
            first_call_s = time.time() - t0
            if name != "x quant":
                ref_name = ref_of.get(name, name)
                if ref_name not in ref_cache:
                    ref_cache[ref_name] = refs[ref_name]()
                ref = ref_cache[ref_name]
                row["rel_err"][name] = float((y.float() - ref).norm() / ref.norm())
            del y
            row["ms"]["eager"][name] = time_ms(fn, args.warmup_ms, args.rep_ms)
            ready[name] = graphed(fn)
        except Exception as err:  # noqa: BLE001 - report and keep going
            log(f"  {model} {layer} M={m} {name}: FAILED {type(err).__name__}: {str(err)[:300]}")
            row.setdefault("errors", {})[name] = f"{type(err).__name__}: {str(err)[:300]}"
            continue
        if first_call_s > 2:
            row.setdefault("first_call_s", {})[name] = round(first_call_s, 1)
    del ref_cache
    # Graph replays, in interleaved rounds so that clock drift (the GPU heats up during
    # long runs) affects every method alike; the median over rounds is kept.
    rounds = {name: [] for name in ready}
    for _ in range(args.rounds):
        for name, graph in ready.items():
            rounds[name].append(time_ms(graph.replay, args.warmup_ms / 2, args.rep_ms / args.rounds))
    for name, times in rounds.items():
        row["ms"]["graph"][name] = sorted(times)[len(times) // 2]
    row["x_quant_ms"] = {mode: row["ms"][mode].pop("x quant", float("nan")) for mode in ("graph", "eager")}
    for mode in ("graph", "eager"):
        row["tflops"][mode] = {name: 2.0 * m * n * k / ms / 1e9 for name, ms in row["ms"][mode].items()}
    del x, w, methods, refs, ready
    torch.cuda.empty_cache()
    return row


def format_table(rows, mode):
    cols = [c for c in METHODS if any(c in r["tflops"][mode] for r in rows)]
    head = (f"{'model':5} {'layer':8} {'M':>5} {'N':>6} {'K':>6} {'xq µs':>6} | "
            + " | ".join(f"{c:>12}" for c in cols))
    lines = [head, "-" * len(head)]
    for r in rows:
        tflops = r["tflops"][mode]
        bf16 = tflops.get("bf16")
        cells = []
        for c in cols:
            t = tflops.get(c)
            if t is None:
                cells.append(f"{'—':>12}")
            elif c == "bf16" or bf16 is None:
                cells.append(f"{t:7.0f}      ")
            else:
                cells.append(f"{t:6.0f} {t / bf16:4.2f}×")
        lines.append(f"{r['model']:5} {r['layer']:8} {r['M']:>5} {r['N']:>6} {r['K']:>6} "
                     f"{r['x_quant_ms'][mode] * 1e3:6.0f} | " + " | ".join(cells))
    return "\n".join(lines)


def check_targets(rows, mode):
    out = []
    for label, method, shapes, goal in TARGETS:
        got = []
        for r in rows:
            tflops = r["tflops"][mode]
            if r["M"] == 8192 and (r["model"], r["layer"]) in shapes and method in tflops and "bf16" in tflops:
                got.append((f"{r['model']} {r['layer']}", tflops[method] / tflops["bf16"]))
        if not got:
            continue
        worst = min(v for _, v in got)
        status = "MET" if worst >= goal else "MISSED"
        detail = ", ".join(f"{s} {v:.2f}×" for s, v in got)
        out.append(f"{status:6} {label} ≥ {goal}× ({mode}): {detail}")
    return "\n".join(out)


def compare_impls(args, gen):
    """The fused GEMM with TMA loads vs pointer loads, both autotuned, at M = 8192."""
    import qdoctor.kernels as K

    lines = []
    for model, layer, n, k in [("70b", "gate_up", 28672, 8192), ("8b", "o", 4096, 4096)]:
        m = 8192
        q_x = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8, generator=gen)
        q_w = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8, generator=gen)
        s_x = torch.rand(m, device="cuda", generator=gen) + 0.5
        s_w = torch.rand(n, device="cuda", generator=gen) * 1e-3
        for impl in ("tma", "ptr"):
            try:
                fn = lambda: K.int8_gemm(q_x, s_x, q_w, s_w, impl=impl, autotune=True)  # noqa: E731
                fn()
                ms = time_ms(fn, args.warmup_ms, args.rep_ms)
                lines.append(f"{model} {layer} M={m}: {impl:3} {2.0 * m * n * k / ms / 1e9:6.0f} TOP/s")
            except Exception as err:  # noqa: BLE001
                lines.append(f"{model} {layer} M={m}: {impl} FAILED {type(err).__name__}: {str(err)[:200]}")
    return "\n".join(lines)


def sweep_quant(args):
    """Bandwidth of the activation-quantization kernel for several launch shapes (M = 8192)."""
    from qdoctor.kernels._triton_act_quant import _launch_shape, quantize_rows

    lines = []
    for k in (4096, 8192, 14336, 28672):
        x = torch.randn(8192, k, device="cuda", dtype=torch.bfloat16)
        expected = quantize_rows(x, fp8=False)[0]
        p2 = 1 << (k - 1).bit_length()
        shapes = [dict(one_pass=True, block_k=p2, num_warps=w) for w in (4, 8, 16) if p2 <= 16384]
        shapes += [dict(one_pass=False, block_k=b, num_warps=w) for b in (2048, 4096, 8192) for w in (4, 8, 16)
                   if b < k and b // (32 * w) >= 8]
        default = dict(zip(("one_pass", "block_k", "num_warps"), _launch_shape(k)))
        for launch in shapes:
            try:
                same = torch.equal(quantize_rows(x, fp8=False, launch=launch)[0], expected)
                ms = time_ms(lambda: quantize_rows(x, fp8=False, launch=launch), args.warmup_ms, args.rep_ms)
            except Exception as err:  # noqa: BLE001
                lines.append(f"K={k} {launch}: FAILED {type(err).__name__}")
                continue
            gbs = (x.numel() * 3 + 8192 * 4) / ms / 1e6
            mark = " (default)" if launch == default else ""
            lines.append(f"K={k:5} {launch}: {ms * 1e3:6.0f} µs {gbs:5.0f} GB/s same={same}{mark}")
        del x, expected
    return "\n".join(lines)


def probe_warp_specialization() -> int:
    """Child process: does a warp-specialized config compile, run and give exact results?"""
    import qdoctor.kernels as K
    from qdoctor.kernels import _triton_gemm as G

    gen = torch.Generator(device="cuda").manual_seed(0)
    m = n = k = 4096
    q_x = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8, generator=gen)
    q_w = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8, generator=gen)
    one = torch.ones(1, device="cuda")
    for cfg in G._WS_CONFIGS:
        config = G.make_config(*cfg, warp_specialize=True)
        acc = G.gemm(q_x, one, q_w, one.expand(n), out_dtype=None, use_tma=True, config=config)
        exact = torch.equal(acc, K.reference_int8_mm(q_x, q_w))
        ms = time_ms(lambda: G.gemm(q_x, one, q_w, one.expand(n), out_dtype=None, use_tma=True, config=config), 10, 50)
        print(f"warp-specialized {cfg}: exact={exact} {2.0 * m * n * k / ms / 1e9:.0f} TOP/s", flush=True)
        if not exact:
            return 1
    s_x = torch.rand(m, device="cuda", generator=gen) * 0.01
    s_w = torch.rand(n, k // GROUP, device="cuda", generator=gen) * 0.001
    exact = K.reference_int8_gemm_grouped(q_x, s_x, q_w, s_w, GROUP, None, torch.float64)
    for cfg in G._WS_GROUP_CONFIGS:
        config = G.make_config(cfg[0], cfg[1], None, *cfg[2:], warp_specialize=True)
        run = lambda: G.gemm(q_x, s_x, q_w, s_w, out_dtype=torch.float32, group_size=GROUP,  # noqa: E731
                             use_tma=True, config=config)
        err = float((run().double() - exact).norm() / exact.norm())
        ms = time_ms(run, 10, 50)
        print(f"warp-specialized per-group {cfg}: rel err {err:.1e} {2.0 * m * n * k / ms / 1e9:.0f} TOP/s",
              flush=True)
        if not err < 1e-5:
            return 1
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="8b,70b")
    ap.add_argument("--m", default="16,256,2048,8192")
    ap.add_argument("--json", default=None, help="write all numbers here")
    ap.add_argument("--warmup-ms", type=float, default=10)
    ap.add_argument("--rep-ms", type=float, default=50)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of graph timings")
    ap.add_argument("--no-ws-probe", action="store_true", help="skip trying warp-specialized configs")
    ap.add_argument("--no-impl-compare", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated methods to time besides bf16 (default: all)")
    ap.add_argument("--quant-sweep", action="store_true", help="also sweep the x-quantization launch shapes")
    ap.add_argument("--probe-ws", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe_ws:
        sys.exit(probe_warp_specialization())
    if not torch.cuda.is_available():
        sys.exit("bench/gemm.py needs a CUDA GPU")
    import triton

    from qdoctor.kernels import _triton_gemm

    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference products stay fp32

    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "sms": torch.cuda.get_device_properties(0).multi_processor_count}
    log(f"# {info}")
    if not args.no_ws_probe:
        env = {**os.environ, "QDOCTOR_TRITON_WS": "1", "PYTHONUNBUFFERED": "1"}
        try:
            probe = subprocess.run([sys.executable, __file__, "--probe-ws"], env=env, capture_output=True,
                                   text=True, timeout=240)
            ok, text = probe.returncode == 0, (probe.stdout + probe.stderr)[-1500:]
        except subprocess.TimeoutExpired:
            ok, text = False, "timed out"
        log(f"# warp-specialization probe: {'ok' if ok else 'failed'}\n{text.strip()}")
        info["ws_probe"] = {"ok": ok, "output": text}
        if ok:
            os.environ["QDOCTOR_TRITON_WS"] = "1"
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for model in args.models.split(","):
        for layer, n, k in SHAPES[model]:
            for m in (int(v) for v in args.m.split(",")):
                rows.append(bench_shape(model, layer, n, k, m, args, gen))
                r = rows[-1]
                log(f"  {model} {layer} M={m}: " + ", ".join(f"{c} {t:.0f}" for c, t in r["tflops"]["graph"].items())
                    + f" | max rel err {max(r['rel_err'].values(), default=0):.1e}")
    tables, targets = {}, {}
    for mode, title in (("graph", "GPU time: CUDA-graph replay of one call"),
                        ("eager", "eager: one Python call, launch overhead included")):
        tables[mode] = format_table(rows, mode)
        targets[mode] = check_targets(rows, mode)
        log(f"\n# TFLOP/s (TOP/s for integer paths) and ratio vs BF16 — {title}\n" + tables[mode])
    log("\n" + targets["graph"] + "\n" + targets["eager"])
    impls = "" if args.no_impl_compare else compare_impls(args, gen)
    if impls:
        log("\n# fused INT8 GEMM, TMA vs pointer loads (autotuned each)\n" + impls)
    quant = sweep_quant(args) if args.quant_sweep else ""
    if quant:
        log("\n# activation quantization (int8, bf16 x, M = 8192): launch shapes\n" + quant)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows, "tables": tables, "targets": targets, "impls": impls,
                       "quant_sweep": quant, "tuned_configs": _triton_gemm.tuned_configs()}, f, indent=1)


if __name__ == "__main__":
    main()
