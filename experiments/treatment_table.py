"""Issue 5's table: every treatment in three W8A8 settings, on WikiText-2 test.

    python experiments/treatment_table.py --model smollm2-135m [--device cuda] [--limit N] --json out.json

Settings: (a) per-channel W + per-token dynamic A, (b) per-channel W + per-tensor static A,
(c) per-tensor W + per-tensor static A. Methods: naive, SmoothQuant α=0.5/0.8, bi-smoothing
(max, median; α=0.5), spike-aware keep (BF16 / FP8) of the spikiest layers (spike ratio ≥
--spike-ratio, at most 3% of layers), mixed granularity (per-group on layers whose
per-channel INT8 output error > 1%, at most 3%), and the automatic plan (`qdoctor fix`)
with budgets (a) 0.5%, (b) 3%, (c) 3% on held-out text. Calibration: 64 × 512 tokens from
the first 80% of WikiText-2 valid; held-out scoring: its last 20%; the table: test split.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import qdoctor
from qdoctor.calib.collect import CalibrationConfig
from qdoctor.calib.text import text_source
from qdoctor.eval.perplexity import perplexity, token_windows
from qdoctor.models.registry import arch_for
from qdoctor.policy.evidence import cap, rank_spikes, rank_weight_outliers
from qdoctor.policy.search import FixConfig, Plan, Searcher, group_scheme, keep_scheme, search
from qdoctor.transforms.smoothing import SmoothingStep

SETTINGS = {"a": ("w8a8-channel-token", 0.5), "b": ("w8a8-channel-tensor-static", 3.0),
            "c": ("w8a8-tensor-tensor-static", 3.0)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--limit", type=int, default=None, help="test windows (default: the whole split)")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--spike-ratio", type=float, default=20.0)
    ap.add_argument("--settings", default="abc")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()

    model, tok = qdoctor.load(args.model, dtype=args.dtype, device=args.device)
    bos = tok.bos_token_id if arch_for(model).needs_bos else None
    test = token_windows(tok, text_source("wikitext2:test"), args.seqlen, bos)
    if args.limit:
        test = test[: args.limit]
    cal = CalibrationConfig(n_samples=args.calib_samples, seqlen=512, sample_rows=512, holdout_fraction=0.2)
    rows, out = [], {"model": args.model, "test_windows": int(test.shape[0]), "seqlen": args.seqlen,
                     "calibration": cal.__dict__, "settings": {}}
    for key in args.settings:
        target, budget = SETTINGS[key]
        t0 = time.perf_counter()
        cfg = FixConfig(target=target, budget_pct=budget, eval_windows=args.eval_windows, calibration=cal)
        s = Searcher(model, tok, cfg, progress=False)
        fp = s.fp_ppl_of(test)
        n = len(s.names)
        spikes = cap(rank_spikes(s.evidence, args.spike_ratio), n, 0.03)
        outliers = cap(rank_weight_outliers(s.evidence, 0.01), n, 0.03)
        plans = [
            Plan(label="naive"),
            Plan([SmoothingStep("smoothquant", 0.5)], label="smoothquant-0.5"),
            Plan([SmoothingStep("smoothquant", 0.8)], label="smoothquant-0.8"),
            Plan([SmoothingStep("bismooth-max", 0.5)], label="bismooth-max"),
            Plan([SmoothingStep("bismooth-median", 0.5)], label="bismooth-median"),
            Plan(overrides={n_: keep_scheme(s.target, "bf16") for n_ in spikes}, label="spike-keep-bf16"),
            Plan(overrides={n_: keep_scheme(s.target, "fp8") for n_ in spikes}, label="spike-keep-fp8"),
            Plan(overrides={n_: group_scheme(s.target, s.group_size(n_)) for n_ in outliers},
                 label="mixed-granularity"),
        ]
        res = {"fp_ppl": fp, "spike_layers": spikes, "weight_outlier_layers": outliers, "methods": []}
        for plan in plans:
            tr = s.evaluate(plan, windows=test)
            res["methods"].append(tr.to_dict())
            print(f"[{key}] {tr.label:<18} PPL {tr.ppl:8.3f} {tr.delta_pct:+8.2f}%  kept {tr.kept} "
                  f"per-group {tr.per_group}  {tr.seconds:.0f}s", flush=True)
        fix = search(model, tok, searcher=s, progress=False)
        tr = s.evaluate(fix.best.plan, windows=test)
        d = tr.to_dict()
        d.update({"label": f"auto ({fix.best.label})", "heldout_delta_pct": fix.best.delta_pct, "met": fix.met,
                  "search_seconds": round(fix.seconds, 1), "recipe": fix.recipe.to_dict()})
        res["methods"].append(d)
        res["search_trials"] = [t.to_dict() for t in fix.trials]
        print(f"[{key}] auto: {fix.best.label} PPL {tr.ppl:.3f} {tr.delta_pct:+.2f}% kept {tr.kept} "
              f"per-group {tr.per_group} (held-out {fix.best.delta_pct:+.2f}%, met={fix.met}, "
              f"search {fix.seconds:.0f}s)", flush=True)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        out["settings"][key] = {"target": target, "budget_pct": budget, **res}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
