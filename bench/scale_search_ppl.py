"""WikiText-2 test perplexity of static W8A8 schemes with absmax vs ``mse`` observers (weights,
activations, both), one calibration shared by every plan.

    python bench/scale_search_ppl.py --limit 4                   # CPU, SmolLM2-135M, 4 windows × 2048
    python bench/scale_search_ppl.py --device cuda --dtype bf16   # whole test split on a GPU

Printed per plan (and written to --json after each one, so a long run leaves what it measured):
PPL, % vs full precision, seconds (calibration counted once, in the first plan that needs it).
"""

from __future__ import annotations

import argparse
import json
import time

BASES = {"w8a8-tensor-tensor-static": "tensor", "w8a8-channel-tensor-static": "channel"}
VARIANTS = {"absmax": ("absmax", "absmax"), "mse-act": ("absmax", "mse"), "mse-weights": ("mse", "absmax"),
            "mse-both": ("mse", "mse")}


def plans():
    from qdoctor.quant.spec import Scheme

    for base, wgran in BASES.items():
        for variant, (wobs, aobs) in VARIANTS.items():
            yield Scheme.from_dict({"name": f"{base}/{variant}", "default": {
                "weights": {"dtype": "int8", "granularity": wgran, "observer": wobs},
                "activations": {"dtype": "int8", "granularity": "tensor", "dynamic": False, "observer": aobs}}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--limit", type=int, default=None, help="first N test windows (default: all)")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--sample-rows", type=int, default=512)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import qdoctor
    from qdoctor.calib.text import text_source
    from qdoctor.eval.perplexity import perplexity, token_windows
    from qdoctor.models.registry import bos_token_id
    from qdoctor.policy.recipe import Recipe

    model, tok = qdoctor.load(args.model, dtype=args.dtype, device=args.device)
    windows = token_windows(tok, text_source("wikitext2:test"), args.seqlen, bos_token_id(model, tok))
    t0 = time.perf_counter()
    fp = perplexity(model, tok, windows=windows, limit=args.limit, progress=True, desc="perplexity (fp)")
    rows = [{"plan": "full-precision", "ppl": fp.ppl, "seconds": round(time.perf_counter() - t0, 1)}]
    print(f"full-precision  ppl {fp.ppl:.4f}", flush=True)
    cfg = qdoctor.CalibrationConfig(n_samples=args.calib_samples, seqlen=args.calib_seqlen,
                                    sample_rows=args.sample_rows)
    stats = None
    for scheme in plans():
        t0 = time.perf_counter()
        recipe = Recipe.of(scheme, cfg)
        stats = recipe.statistics(model, tok, stats)
        ppl, _ = recipe.perplexity(model, tok, windows, stats, limit=args.limit, progress=True,
                                   desc=f"perplexity ({scheme.name})")
        rows.append({"plan": scheme.name, "ppl": ppl.ppl, "delta_pct": 100.0 * (ppl.ppl / fp.ppl - 1.0),
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{scheme.name:45s} ppl {ppl.ppl:.4f}  {rows[-1]['delta_pct']:+.2f}%  {rows[-1]['seconds']}s", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "windows": fp.n_windows, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
