"""The issue-15 table: every method alone and the auto plan, on the full WikiText-2 test split.

    python bench/methods.py [--model smollm2-135m] [--settings a,b,c] [--limit N] [--json out.json]
                            [--tasks-items 500] [--planted DIR]

Settings (the target scheme of the search):
  (a) w8a8-channel-token          INT8 per-channel W, per-token dynamic A
  (b) w8a8-channel-tensor-static  INT8 per-channel W, per-tensor static A
  (c) w8a8-tensor-tensor-static   INT8 per-tensor W, per-tensor static A

Rows per setting, each measured on the same test windows (seqlen 2048, all of them unless
--limit), calibration from WikiText-2 valid (64 × 512, the search's own held-out part of valid
for plan scoring):
  naive             the target scheme everywhere (round to nearest, absmax scales)
  previous auto     the plan search with the steps it had before (smoothing, per-group, keep,
                    prune: ``FixConfig.methods=()``)
  gptq              GPTQ (1 % dampening, blocks of 128 columns)
  rotation          Hadamard R1 + R2 (offline), and + R4 (online before down_proj)
  mse               MSE-searched scales: weight clip search (+ the mse observer for static A)
  smoothquant-gptq  llm-compressor's standard recipe (SmoothQuant 0.8 + GPTQ)
  auto              the plan search with every step (``FixConfig.methods=METHODS``)
Columns: PPL, % vs FP, layers out of the target INT8 scheme (kept + per-group), seconds to
search (auto rows) and to calibrate/prepare the plan (GPTQ, rotation statistics).

With --tasks-items N the best (b) plan is also scored zero-shot on the eight shipped tasks
(N seeded items each) against FP (the (b) auto search runs for it when b is not in --settings);
with --planted DIR (``qdoctor plant`` output) the --planted-settings (default a,b; ``b@vllm:ampere``
searches under that serve profile) are searched on the planted model and compared with the
unplanted model's naive W8A8 (measured here when the setting itself is not in --settings;
--settings "" runs the planted part alone).
Prints one table per setting and writes everything to --json.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import qdoctor
from qdoctor.calib.text import text_source
from qdoctor.eval.zeroshot.evaluate import evaluate
from qdoctor.eval.perplexity import token_windows
from qdoctor.models.registry import block_linear_names, bos_token_id
from qdoctor.policy.recipe import NAMED_RECIPES, Recipe
from qdoctor.policy.search import METHODS, FixConfig, Searcher, resolve_target, search

SETTINGS = {"a": ("w8a8-channel-token", 0.5), "b": ("w8a8-channel-tensor-static", 1.5),
            "c": ("w8a8-tensor-tensor-static", 3.0)}
TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "lambada_openai", "openbookqa", "piqa", "winogrande")


def method_recipes(target: str, calibration) -> dict[str, Recipe]:
    """The single-method plans of one setting, as recipe files would write them."""
    scheme = resolve_target(target)
    static = scheme.default.activations is not None and not scheme.default.activations.dynamic
    base = {"scheme": scheme.to_dict(), "calibration": {k: getattr(calibration, k) for k in
                                                        ("n_samples", "seqlen", "source", "seed", "sample_rows")}}

    def with_observers(w: str, a: str | None) -> dict:
        d = json.loads(json.dumps(scheme.to_dict()))
        d["default"]["weights"]["observer"] = w
        if a is not None:
            d["default"]["activations"]["observer"] = a
        return d

    plans = {
        "gptq": {**base, "gptq": {}},
        "rotation r1+r2": {**base, "rotation": {"r1": True, "r2": True, "r4": False}},
        "rotation r1+r2+r4": {**base, "rotation": {"r1": True, "r2": True, "r4": True}},
        "mse weights": {**base, "scheme": with_observers("mse", None)},
    }
    if static:
        plans["mse weights+acts"] = {**base, "scheme": with_observers("mse", "mse")}
    out = {k: Recipe.from_dict(v) for k, v in plans.items()}
    out["smoothquant-gptq"] = NAMED_RECIPES["smoothquant-gptq"](scheme)
    return out


def naive_recipe(target: str) -> Recipe:
    """The target scheme everywhere, round to nearest, absmax scales, the search's calibration."""
    return Recipe.of(resolve_target(target), FixConfig().calibration)


def layers_out(recipe: Recipe, names: list[str]) -> int:
    """Layers whose scheme differs from the target's default (kept, FP8 or per-group)."""
    return sum(1 for n in names if recipe.scheme.resolve(n) != recipe.scheme.default)


def measure(label, recipe, model, tok, windows, fp, names, seconds_search=None):
    t0 = time.perf_counter()
    ppl = recipe.perplexity(model, tok, windows, desc=label)[0].ppl
    row = {"plan": label, "ppl": ppl, "delta_pct": 100 * (ppl / fp - 1), "layers_out": layers_out(recipe, names),
           "measure_s": round(time.perf_counter() - t0, 1)}
    if seconds_search is not None:
        row["search_s"] = round(seconds_search, 1)
    print(f"  {label:<34} PPL {ppl:9.4f}  {row['delta_pct']:+7.2f}%  out {row['layers_out']:>3}  "
          f"{row['measure_s']:6.1f}s" + (f"  search {seconds_search:6.1f}s" if seconds_search else ""), flush=True)
    return row


def auto_row(label, methods, key, model, tok, windows, fp, names, progress, fix_kwargs) -> dict:
    """The plan search of setting ``key`` with ``methods``, its plan measured on the test windows."""
    target, budget = SETTINGS[key]
    cfg = FixConfig(target=target, budget_pct=budget, methods=methods, serve="any", **fix_kwargs)
    t0 = time.perf_counter()
    res = search(model, tok, cfg, searcher=Searcher(model, tok, cfg, progress=progress), progress=progress)
    row = measure(f"{label}: {res.best.label}", res.recipe, model, tok, windows, fp, names, time.perf_counter() - t0)
    row["heldout_delta_pct"] = res.best.delta_pct
    row["trials"] = [t.to_dict() for t in res.trials]
    row["recipe"] = res.recipe.to_dict()
    return row


def run_setting(key, model, tok, windows, fp, names, progress, fix_kwargs) -> dict:
    target, budget = SETTINGS[key]
    print(f"\n== ({key}) {target}, budget {budget}%", flush=True)
    rows = []
    naive = naive_recipe(target)
    rows.append(measure("naive", naive, model, tok, windows, fp, names))
    for label, methods in (("previous auto", ()), ("auto", METHODS)):
        rows.append(auto_row(label, methods, key, model, tok, windows, fp, names, progress, fix_kwargs))
    for label, recipe in method_recipes(target, FixConfig().calibration).items():
        rows.append(measure(label, recipe, model, tok, windows, fp, names))
    return {"target": target, "budget_pct": budget, "rows": rows}


def zeroshot(model, tok, items: int) -> dict[str, float]:
    """acc of each of the eight tasks on its first ``items`` items."""
    res = evaluate(model, tok, TASKS, limit=items, batch_size=64, progress=False)
    return {t: r.metrics["acc"] for t, r in res.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--settings", default="a,b,c")
    ap.add_argument("--limit", type=int, default=None, help="test windows (default: the full split)")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--tasks-items", type=int, default=0)
    ap.add_argument("--planted", default=None, help="a `qdoctor plant` output folder")
    ap.add_argument("--planted-settings", default="a,b",
                    help="settings searched on the planted model, each optionally @RUNTIME[:GPU] (default serve any), "
                         "e.g. a,b,b@vllm:ampere")
    ap.add_argument("--json", default=None)
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    model, tok = qdoctor.load(args.model, dtype="fp32")
    names = block_linear_names(model)
    windows = token_windows(tok, text_source("wikitext2:test"), args.seqlen, bos_token_id(model, tok))
    if args.limit:
        windows = windows[: args.limit]
    info = {"model": args.model, "device": str(next(model.parameters()).device), "torch": torch.__version__,
            "windows": int(windows.shape[0]), "seqlen": args.seqlen, "layers": len(names)}
    fp = qdoctor.perplexity(model, tok, windows=windows, progress=args.progress).ppl
    print(f"# {info}\nFP PPL {fp:.4f}", flush=True)
    out = {"info": info, "fp_ppl": fp, "settings": {}}
    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)

    for key in filter(None, args.settings.split(",")):
        out["settings"][key] = run_setting(key, model, tok, windows, fp, names, args.progress, {})
        save()
    if args.tasks_items:
        if "b" in out["settings"]:
            rows = out["settings"]["b"]["rows"]
        else:  # the (b) auto search alone, its plan measured on the test windows as in the table
            print("\n== (b) auto plan for the zero-shot run", flush=True)
            rows = [auto_row("auto", METHODS, "b", model, tok, windows, fp, names, args.progress, {})]
            out["zeroshot_plan_row"] = rows[0]
        best = min((r for r in rows if "recipe" in r), key=lambda r: r["ppl"])
        recipe = Recipe.from_dict(best["recipe"])
        fp_acc = zeroshot(model, tok, args.tasks_items)
        with recipe.applied(model, tok):
            plan_acc = zeroshot(model, tok, args.tasks_items)
        out["zeroshot"] = {"plan": best["plan"], "items": args.tasks_items, "fp": fp_acc, "plan_acc": plan_acc,
                           "fp_mean": sum(fp_acc.values()) / len(fp_acc),
                           "plan_mean": sum(plan_acc.values()) / len(plan_acc)}
        z = out["zeroshot"]
        print(f"\nzero-shot (b) {best['plan']}: FP mean {100 * z['fp_mean']:.2f}, plan {100 * z['plan_mean']:.2f} "
              f"({100 * (z['plan_mean'] - z['fp_mean']):+.2f} points); per task "
              + ", ".join(f"{t} {100 * fp_acc[t]:.1f}/{100 * plan_acc[t]:.1f}" for t in fp_acc), flush=True)
        save()
    if args.planted:
        pm, ptok = qdoctor.load(args.planted, dtype="fp32")
        out["planted"] = {}
        for entry in args.planted_settings.split(","):
            key, _, serve = entry.partition("@")
            runtime, _, gpu = (serve or "any").partition(":")
            target, budget = SETTINGS[key]
            rows = out["settings"].get(key, {}).get("rows", [])
            unplanted = rows[0]["ppl"] if rows else naive_recipe(target).perplexity(model, tok, windows)[0].ppl
            cfg = FixConfig(target=target, budget_pct=budget, methods=METHODS, serve=runtime,
                            **({"gpu": gpu} if gpu else {}))
            t0 = time.perf_counter()
            res = search(pm, ptok, cfg, searcher=Searcher(pm, ptok, cfg, progress=args.progress),
                         progress=args.progress)
            seconds = time.perf_counter() - t0
            naive = naive_recipe(target).perplexity(pm, ptok, windows)[0].ppl
            ppl = res.recipe.perplexity(pm, ptok, windows)[0].ppl
            out["planted"][entry] = {"target": target, "serve": cfg.profile.describe(), "plan": res.best.label,
                                     "naive_ppl": naive, "ppl": ppl, "unplanted_naive_ppl": unplanted,
                                     "search_s": round(seconds, 1), "vs_unplanted_pct": 100 * (ppl / unplanted - 1),
                                     "heldout_delta_pct": res.best.delta_pct, "recipe": res.recipe.to_dict(),
                                     "layers_out": layers_out(res.recipe, names)}
            print(f"planted ({entry}) {target} on {cfg.profile.describe()}: naive {naive:.3f}, plan {res.best.label} "
                  f"{ppl:.3f} (out {layers_out(res.recipe, names)}), unplanted naive {unplanted:.3f}, vs unplanted "
                  f"{out['planted'][entry]['vs_unplanted_pct']:+.2f}%, search {seconds:.0f}s", flush=True)
            save()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
