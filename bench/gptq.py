"""GPTQ on SmolLM2-135M: time of the GPTQ pass (64 × 512 calibration windows, issue 15's
benchmark) and perplexity of round-to-nearest vs GPTQ on a few WikiText-2 test windows.

    python bench/gptq.py                              # CPU, fp32, 3 schemes, 4 × 2048 test windows
    python bench/gptq.py --device cuda                # the same on a GPU
    python bench/gptq.py --schemes w8a8-tensor-tensor-static --windows 8 --act-order

Printed per scheme: the GPTQ pass's wall time split into the calibration pass (the forwards
through every block with the Hessian hooks) and GPTQ's math (Cholesky + column updates), its
ratio to the ≈ 300 s that llm-compressor's GPTQModifier took on the same data and model on
another machine (a stated figure from issue 15, not measured here), and PPL of full precision,
RTN and GPTQ. The machine's load average is printed too: timings on a shared CPU vary with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

LLM_COMPRESSOR_GPTQ_SECONDS = 300.0  # issue 15: GPTQModifier, SmolLM2-135M, 64 × 512, measured elsewhere

SCHEMES = ("w8a8-channel-token", "w8a8-channel-tensor-static", "w8a8-tensor-tensor-static")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4, help="WikiText-2 test windows for PPL")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--propagate", action="store_true")
    args = ap.parse_args(argv)

    import torch

    import qdoctor
    from qdoctor.calib.collect import CalibrationConfig
    from qdoctor.calib.text import text_source
    from qdoctor.eval.perplexity import perplexity, token_windows
    from qdoctor.models.registry import bos_token_id
    from qdoctor.policy.recipe import Recipe
    from qdoctor.quant.gptq import GPTQConfig
    from qdoctor.quant.spec import get_scheme

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start, device {args.device}")
    model, tok = qdoctor.load(args.model, dtype=args.dtype, device=args.device)
    windows = token_windows(tok, text_source("wikitext2:test"), args.seqlen, bos_token_id(model, tok))[:args.windows]
    cal = CalibrationConfig(n_samples=args.calib_samples, seqlen=args.calib_seqlen)
    gptq = GPTQConfig(act_order=args.act_order, propagate=args.propagate)
    fp = perplexity(model, tok, windows=windows, progress=False)
    print(f"full precision: PPL {fp.ppl:.4f} on {fp.n_windows} × {fp.seqlen} WikiText-2 test tokens", flush=True)
    print(f"calibration {cal.n_samples} × {cal.seqlen} tokens of {cal.source}; {gptq}")
    for name in args.schemes.split(","):
        rtn = Recipe(scheme=get_scheme(name), calibration=cal)
        with_gptq = dataclasses.replace(rtn, gptq=gptq)
        stats = rtn.statistics(model, tok)
        t0 = time.perf_counter()
        store = with_gptq.gptq_weights(model, tok, stats, progress=True)
        total = time.perf_counter() - t0
        print(f"{name}: GPTQ pass {total:.1f}s = calibration pass {store.seconds['calibration']:.1f}s + "
              f"GPTQ math {store.seconds['gptq']:.1f}s (load average {os.getloadavg()[0]:.1f}); "
              f"vs llm-compressor GPTQModifier's stated ≈{LLM_COMPRESSOR_GPTQ_SECONDS:.0f}s elsewhere: "
              f"{total / LLM_COMPRESSOR_GPTQ_SECONDS:.2f}×", flush=True)
        p_rtn, _ = rtn.perplexity(model, tok, windows, stats=stats)
        p_gptq, _ = with_gptq.perplexity(model, tok, windows, stats=stats, gptq=store)  # the weights just timed
        print(f"  PPL RTN {p_rtn.ppl:.4f} ({100 * (p_rtn.ppl / fp.ppl - 1):+.2f}%), "
              f"GPTQ {p_gptq.ppl:.4f} ({100 * (p_gptq.ppl / fp.ppl - 1):+.2f}%)", flush=True)


if __name__ == "__main__":
    main()
