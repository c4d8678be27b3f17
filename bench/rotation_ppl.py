"""Hadamard rotations on a real model: WikiText-2 test perplexity, FP vs naive W8A8 vs rotated.

    python bench/rotation_ppl.py [--model smollm2-135m] [--limit 4] [--seqlen 2048] [--device cpu|cuda]
                                 [--calib-samples 64] [--plans 0,1,2,3,4] [--no-fp]

For each setting (w8a8-tensor-tensor-static, w8a8-channel-token): the plain scheme, then the same
scheme under R1+R2 (and R1+R2+R4 for the static one), each calibrated with the recipe's default
config (``--calib-samples`` × 512 tokens of WikiText-2 valid, default 64) in the plan's own basis. Prints one JSON line per
plan (PPL, % vs FP, calibration + evaluation seconds). Runs unchanged on CUDA.
"""

from __future__ import annotations

import argparse
import json
import time

import qdoctor
from qdoctor.calib.collect import CalibrationConfig
from qdoctor.eval.perplexity import perplexity, token_windows
from qdoctor.calib.text import text_source
from qdoctor.models.registry import bos_token_id
from qdoctor.policy.recipe import Recipe
from qdoctor.quant.spec import get_scheme
from qdoctor.transforms.rotation import RotationStep

PLANS = [
    ("w8a8-tensor-tensor-static", None), ("w8a8-tensor-tensor-static", RotationStep()),
    ("w8a8-tensor-tensor-static", RotationStep(r4=True)),
    ("w8a8-channel-token", None), ("w8a8-channel-token", RotationStep()),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--limit", type=int, default=4, help="windows evaluated (0: the whole split)")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--plans", default=",".join(str(i) for i in range(len(PLANS))), help="indices into PLANS")
    ap.add_argument("--no-fp", action="store_true", help="skip the full-precision perplexity")
    args = ap.parse_args()
    calibration = CalibrationConfig(n_samples=args.calib_samples)
    model, tok = qdoctor.load(args.model, dtype="fp32", device=args.device)
    windows = token_windows(tok, text_source("wikitext2:test"), args.seqlen, bos_token_id(model, tok))
    fp = None
    if not args.no_fp:
        fp = perplexity(model, tok, windows=windows, limit=args.limit or None, progress=False)
        print(json.dumps({"plan": "fp32", "ppl": fp.ppl, "windows": fp.n_windows, "seqlen": fp.seqlen}), flush=True)
    for scheme, rot in (PLANS[int(i)] for i in args.plans.split(",")):
        recipe = Recipe(scheme=get_scheme(scheme), rotation=rot, calibration=calibration)
        t0 = time.perf_counter()
        stats = recipe.statistics(model, tok)
        t1 = time.perf_counter()
        q, _ = recipe.perplexity(model, tok, windows, stats=stats, limit=args.limit or None)
        print(json.dumps({"plan": scheme, "rotation": rot.basis if rot else "none", "ppl": q.ppl,
                          "pct_vs_fp": 100 * (q.ppl / fp.ppl - 1) if fp else None,
                          "calib_samples": args.calib_samples, "calib_s": round(t1 - t0, 1),
                          "eval_s": round(time.perf_counter() - t1, 1)}), flush=True)


if __name__ == "__main__":
    main()
