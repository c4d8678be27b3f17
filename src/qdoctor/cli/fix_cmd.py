"""``qdoctor fix``: search the cheapest plan that meets a perplexity budget, verify it on the
test split, and write it as a re-applicable recipe."""

from __future__ import annotations

import time

from qdoctor.cli.common import add_calib_args, add_model_args, load_model, positive_int, require_parent, say
from qdoctor.errors import QDoctorError


def parse_percent(text: str) -> float:
    t = text.strip().rstrip("%")
    try:
        v = float(t)
    except ValueError:
        raise QDoctorError(f"bad budget {text!r}: use a percentage such as 1% or 0.5") from None
    if v < 0:
        raise QDoctorError("the budget must be ≥ 0%")
    return v


def register(sub) -> None:
    p = sub.add_parser("fix", help="find the cheapest treatment plan that meets a perplexity budget",
                       description="Search smoothing, mixed granularity and spike-aware precision for the plan "
                                   "with the fewest high-precision / per-group layers that keeps held-out "
                                   "perplexity within the budget; then verify it on WikiText-2 test.")
    add_model_args(p)
    p.add_argument("--target", default="w8a8-tensor-static",
                   help="target scheme: w8a8-tensor-static (default), w8a8-channel-static, w8a8-token "
                        "or any named scheme")
    p.add_argument("--budget", default="1%", help="allowed perplexity increase over full precision (default 1%%)")
    p.add_argument("--max-layers", default="3%", help="at most this share of linear layers kept out of INT8 or "
                                                      "per-group (default 3%%)")
    p.add_argument("--keep", default="bf16", choices=["bf16", "fp16", "fp8"],
                   help="precision of layers kept out of INT8 (default bf16)")
    p.add_argument("--eval-windows", type=positive_int, default=4,
                   help="held-out windows scoring each candidate plan (default 4)")
    p.add_argument("--eval-seqlen", type=positive_int, default=2048, help="held-out window length (default 2048)")
    p.add_argument("--limit", type=positive_int, default=4,
                   help="WikiText-2 test windows for the final before/after table (default 4)")
    p.add_argument("--seqlen", type=positive_int, default=2048, help="test window length (default 2048)")
    p.add_argument("--sample-rows", type=positive_int, default=512,
                   help="calibration token rows kept per layer for output errors and median ranges (default 512)")
    add_calib_args(p)
    p.add_argument("--recipe-out", default=None, help="write the plan as a recipe (YAML, or JSON by extension)")
    p.add_argument("--json", default=None, help="write the search and the verification as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from qdoctor.calib.collect import CalibrationConfig
    from qdoctor.policy.search import FixConfig, resolve_target, search

    budget = parse_percent(args.budget)
    max_frac = parse_percent(args.max_layers) / 100.0
    resolve_target(args.target)
    for path in (args.recipe_out, args.json):
        require_parent(path)
    cfg = FixConfig(target=args.target, budget_pct=budget, max_layer_fraction=max_frac, keep=args.keep,
                    eval_windows=args.eval_windows, eval_seqlen=args.eval_seqlen,
                    calibration=CalibrationConfig(n_samples=args.calib_samples, seqlen=args.calib_seqlen,
                                                  source=args.calib_source, seed=args.seed,
                                                  sample_rows=args.sample_rows, holdout_fraction=0.2))
    t0 = time.perf_counter()
    model, tok = load_model(args)
    say("searching (calibration, evidence, candidate plans on held-out text) …")
    result = search(model, tok, cfg)
    print_trials(result)
    verification = verify(model, tok, result, args)
    report = result.to_dict()
    report.update({"model": args.model, "verification": verification, "recipe": result.recipe.to_dict(),
                   "wall_seconds": round(time.perf_counter() - t0, 1)})
    print_verification(verification, result)
    if not result.met:
        say(f"qdoctor: budget NOT met: best plan is {result.best.delta_pct:+.2f}% on held-out text "
            f"(budget {budget}%); the best plan found is shown and written")
    if args.recipe_out:
        from qdoctor.policy.recipe import save_recipe

        save_recipe(result.recipe, args.recipe_out)
        say(f"wrote recipe {args.recipe_out} (apply with: qdoctor quantize --model {args.model} "
            f"--recipe {args.recipe_out})")
    if args.json:
        from qdoctor.io import atomic_write_json

        atomic_write_json(args.json, report)
        say(f"wrote {args.json}")
    return 0 if result.met else 3


def verify(model, tok, result, args) -> dict:
    """FP, naive and planned perplexity on the WikiText-2 test split (``--limit`` windows)."""
    from qdoctor.calib.text import text_source
    from qdoctor.eval.perplexity import perplexity, token_windows
    from qdoctor.models.registry import arch_for
    from qdoctor.policy.recipe import Recipe
    from qdoctor.quant.apply import restore

    bos = tok.bos_token_id if arch_for(model).needs_bos else None
    windows = token_windows(tok, text_source("wikitext2:test"), args.seqlen, bos)[: args.limit]
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {"split": "wikitext2:test", "windows": int(windows.shape[0]), "seqlen": args.seqlen}
    out["fp_ppl"] = perplexity(model, tok, windows=windows, desc="verify: full precision").ppl
    from qdoctor.policy.search import resolve_target

    naive = Recipe(scheme=resolve_target(result.config.target), calibration=result.recipe.calibration)
    for key, recipe in (("naive_ppl", naive), ("planned_ppl", result.recipe)):
        recipe.apply(model, tok, progress=False)
        try:
            out[key] = perplexity(model, tok, windows=windows, desc=f"verify: {key[:-4]}").ppl
        finally:
            restore(model)
            model.load_state_dict(snapshot)
    out["naive_delta_pct"] = 100 * (out["naive_ppl"] / out["fp_ppl"] - 1)
    out["planned_delta_pct"] = 100 * (out["planned_ppl"] / out["fp_ppl"] - 1)
    return out


def print_trials(result) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"plans tried on held-out text (FP PPL {result.fp_ppl:.3f}, budget +{result.config.budget_pct}%)")
    for c in ("plan", "PPL", "Δ vs FP", "kept", "per-group", "s"):
        t.add_column(c, justify="left" if c == "plan" else "right")
    for tr in result.trials:
        mark = " ◀" if tr is result.best else ""
        t.add_row(tr.label + mark, f"{tr.ppl:.3f}", f"{tr.delta_pct:+.2f}%", str(tr.kept), str(tr.per_group),
                  f"{tr.seconds:.0f}")
    Console(width=120).print(t)


def print_verification(v: dict, result) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"WikiText-2 test, {v['windows']} × {v['seqlen']} tokens")
    for c in ("", "PPL", "Δ vs FP", "layers out of INT8 / per-group"):
        t.add_column(c, justify="left" if c == "" else "right")
    t.add_row("full precision", f"{v['fp_ppl']:.3f}", "—", "—")
    t.add_row(f"naive {result.config.target}", f"{v['naive_ppl']:.3f}", f"{v['naive_delta_pct']:+.2f}%", "0 / 0")
    t.add_row(f"plan: {result.best.label}", f"{v['planned_ppl']:.3f}", f"{v['planned_delta_pct']:+.2f}%",
              f"{result.best.kept} / {result.best.per_group} of {result.total_layers}")
    Console(width=120).print(t)
