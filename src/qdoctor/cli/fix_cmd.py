"""``qdoctor fix``: search the cheapest plan that meets a budget — held-out perplexity
(``--metric ppl``, default) or zero-shot accuracy on a seeded task subset
(``--metric tasks:piqa,arc_easy``) — verify it on the test split, and write it as a
re-applicable recipe."""

from __future__ import annotations

import math
import time

from qdoctor.cli.common import (
    add_calib_args,
    add_model_args,
    add_serve_args,
    add_stream_arg,
    load_model,
    positive_int,
    read_recipe,
    refuse_unused,
    require_parent,
    say,
    serve_kwargs,
    was_given,
)
from qdoctor.errors import QDoctorError


def parse_percent(text: str) -> float:
    t = text.strip().rstrip("%")
    try:
        v = float(t)
    except ValueError:
        raise QDoctorError(f"bad budget {text!r}: use a percentage such as 1% or 0.5") from None
    if not math.isfinite(v):
        raise QDoctorError(f"bad budget {text!r}: use a finite percentage such as 1% or 0.5")
    if v < 0:
        raise QDoctorError("the budget must be ≥ 0%")
    return v


def parse_points(text: str) -> float:
    """A budget in accuracy points: ``1``, ``0.5``, ``1pt``, ``2 points`` (``%`` is refused: ambiguous)."""
    t = text.strip().lower()
    if t.endswith("%"):
        raise QDoctorError(f"bad budget {text!r}: with a task metric the budget is a drop in accuracy points "
                           f"(e.g. 1 or 1pt), not a percentage")
    for suffix in ("points", "point", "pts", "pt"):
        if t.endswith(suffix):
            t = t[: -len(suffix)].strip()
            break
    try:
        v = float(t)
    except ValueError:
        raise QDoctorError(f"bad budget {text!r}: use accuracy points such as 1 or 0.5pt") from None
    if not math.isfinite(v):
        raise QDoctorError(f"bad budget {text!r}: use finite accuracy points such as 1 or 0.5pt")
    if not v >= 0:
        raise QDoctorError("the budget must be ≥ 0 points")
    return v


def parse_methods(text: str) -> tuple[str, ...]:
    """``--methods``: ``all``, or names of ``policy.search.METHODS`` (checked by ``FixConfig``)."""
    from qdoctor.policy.search import METHODS

    names = [t.strip() for t in text.split(",") if t.strip()]
    return tuple(METHODS) if names == ["all"] else tuple(dict.fromkeys(names))


TASK_ONLY = ("metric_items", "metric_seed", "task_data")


def register(sub) -> None:
    p = sub.add_parser("fix", help="find the cheapest treatment plan that meets a perplexity or accuracy budget",
                       description="Search smoothing, mixed granularity and spike-aware precision for the plan "
                                   "with the fewest high-precision / per-group layers that keeps held-out "
                                   "perplexity (or, with --metric tasks:…, zero-shot accuracy on a seeded task "
                                   "subset) within the budget; then verify it on WikiText-2 test.")
    add_model_args(p)
    add_stream_arg(p)
    p.add_argument("--target", default="w8a8-tensor-static",
                   help="target scheme: w8a8-tensor-static (default), w8a8-channel-static, w8a8-token "
                        "or any named scheme")
    p.add_argument("--budget", default=None,
                   help="allowed loss vs full precision: with --metric ppl the perplexity increase in percent "
                        "(default 1%%); with a task metric the drop of mean accuracy in percentage points "
                        "(default 1, written 1 or 1pt)")
    p.add_argument("--metric", default="ppl",
                   help="what scores each candidate plan: ppl (held-out perplexity, default) or "
                        "tasks:TASK[,TASK…] / tasks:all (mean zero-shot acc over a seeded subsample of "
                        "--metric-items items per task)")
    p.add_argument("--metric-items", type=int, default=None,
                   help="task metric: items drawn per task (default 200; all when a task has fewer)")
    p.add_argument("--metric-seed", type=int, default=None,
                   help="task metric: seed of the item draw (default 1234); report final accuracy with another "
                        "--task-seed in `qdoctor eval --tasks`")
    p.add_argument("--task-data", default=None,
                   help="task metric: folder with your own <task>.jsonl[.gz] files (docs/zeroshot.md)")
    p.add_argument("--max-layers", default="3%", help="at most this share of linear layers kept out of INT8 or "
                                                      "per-group (default 3%%)")
    p.add_argument("--keep", default="bf16", choices=["bf16", "fp16", "fp8"],
                   help="precision of layers kept out of INT8 (default bf16)")
    p.add_argument("--gptq", action="store_true",
                   help="also try GPTQ weight rounding (default settings) as a candidate step, kept if it scores "
                        "better (free at inference; one more calibration pass per plan scored with it)")
    p.add_argument("--methods", default="",
                   help="further candidate steps, comma-separated, or 'all': rotation (Hadamard R1+R2, and +R4 "
                        "online where the runtime runs it), mse (scale search), gptq, smoothquant-gptq "
                        "(llm-compressor's standard recipe); each costs a calibration pass per plan scored "
                        "(default: none)")
    p.add_argument("--no-polish", dest="polish", action="store_false",
                   help="stop at the first plan that meets the budget; by default the free steps of --methods "
                        "(mse, gptq) and --gptq are still tried on it and kept if better")
    p.add_argument("--eval-windows", type=positive_int, default=4,
                   help="held-out windows scoring each candidate plan (default 4)")
    p.add_argument("--eval-seqlen", type=positive_int, default=2048, help="held-out window length (default 2048)")
    p.add_argument("--limit", type=positive_int, default=4,
                   help="WikiText-2 test windows for the final before/after table (default 4)")
    p.add_argument("--seqlen", type=positive_int, default=2048, help="test window length (default 2048)")
    p.add_argument("--sample-rows", type=positive_int, default=512,
                   help="calibration token rows kept per layer for output errors and median ranges (default 512)")
    add_serve_args(p, "the plan must run on (candidates it cannot run are never tried)")
    p.add_argument("--cost-m", type=positive_int, default=2048,
                   help="tokens per forward at which each plan's GEMM cost vs BF16 is estimated (default 2048)")
    p.add_argument("--gemm-table", default=None,
                   help="GEMM timings written by `python bench/gemm.py --json` (default: the table shipped with "
                        "qdoctor, if one was measured)")
    add_calib_args(p)
    p.add_argument("--scan", default=None,
                   help="start from a saved scan (`qdoctor scan --json scan.json --for-fix`): its findings and "
                        "calibration statistics replace the fix's own calibration pass; its settings must match")
    p.add_argument("--start-from", default=None,
                   help="a recipe to search from (qdoctor's or llm-compressor's): measured as the naive plan, its "
                        "loss attributed to the scan's weight-outlier / spike layers under its scheme, then "
                        "treated like the target scheme (replaces --target)")
    p.add_argument("--recipe-out", default=None, help="write the plan as a recipe (YAML, or JSON by extension)")
    p.add_argument("--json", default=None, help="write the search and the verification as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from qdoctor.calib.collect import CalibrationConfig
    from qdoctor.policy.metric import parse_metric
    from qdoctor.policy.search import FixConfig, Searcher, resolve_target, search
    from qdoctor.quant.gptq import GPTQConfig

    spec = parse_metric(args.metric)
    if spec.name == "ppl":
        given = [f"--{k.replace('_', '-')}" for k in TASK_ONLY if getattr(args, k) is not None]
        if given:
            raise QDoctorError(f"{', '.join(given)} only apply to a task metric (--metric tasks:…)")
        budget = parse_percent(args.budget if args.budget is not None else "1%")
        task_kw = {}
    else:
        budget = parse_points(args.budget if args.budget is not None else "1")
        task_kw = {"metric_items": 200 if args.metric_items is None else args.metric_items,
                   "metric_seed": 1234 if args.metric_seed is None else args.metric_seed,
                   "task_data": args.task_data}
    max_frac = parse_percent(args.max_layers) / 100.0
    methods = parse_methods(args.methods)
    if was_given(args, "polish") and not ({"mse", "gptq"} & set(methods) or args.gptq):
        raise QDoctorError("--no-polish would be ignored: it only stops the free steps of --methods mse,gptq "
                           "or --gptq from running past the budget")
    start = None
    if args.start_from:
        refuse_unused(args, ("target",), "is replaced by --start-from (the search starts from that recipe's scheme)")
        start = read_recipe(args.start_from)
        say(f"{args.start_from}: calibration: the fix's (--calib-*, last 20% held out), not the recipe's own")
    else:
        resolve_target(args.target)
    for path in (args.recipe_out, args.json):
        require_parent(path)
    cfg = FixConfig(target=start.scheme.name if start else args.target, budget_pct=budget, max_layer_fraction=max_frac, keep=args.keep,
                    eval_windows=args.eval_windows, eval_seqlen=args.eval_seqlen,
                    calibration=CalibrationConfig(n_samples=args.calib_samples, seqlen=args.calib_seqlen,
                                                  source=args.calib_source, seed=args.seed,
                                                  sample_rows=args.sample_rows, holdout_fraction=0.2),
                    metric=str(spec), gptq=GPTQConfig() if args.gptq else None, methods=methods,
                    polish=args.polish,
                    **task_kw, **serve_kwargs(args),
                    cost_m=args.cost_m, gemm_table=args.gemm_table)
    if spec.name == "tasks":  # a missing data file fails now, not after loading the model
        from qdoctor.eval.zeroshot import find_task_file

        for task in spec.tasks:
            find_task_file(task, args.task_data)
    saved = load_scan(args.scan, cfg) if args.scan else None  # a mismatch fails before the model is loaded
    say(f"serving profile: {cfg.profile.describe()} — plans it cannot run are not tried (--serve any: no check)")
    t0 = time.perf_counter()
    model, tok = load_model(args)
    say(("searching (the saved scan's statistics and evidence" if saved else "searching (scan: calibration and "
         "evidence") + ", then candidate plans on " +
        ("held-out text" if spec.name == "ppl" else f"{len(spec.tasks)} task(s)") + ") …")
    searcher = Searcher(model, tok, cfg, scan=saved, start=start)
    result = search(model, tok, cfg, searcher=searcher)
    print_trials(result)
    diagnosis = None
    if start is not None:
        from qdoctor.policy.start import diagnose

        diagnosis = diagnose(start, searcher.evidence, result.naive, result.metric_name, cfg.weight_error_threshold,
                             cfg.spike_min_ratio, searcher.arch, model.config)
        print_diagnosis(diagnosis, args.start_from)
    print_skipped(result)
    say(f"estimated speed of the plan: {plan_cost_text(result)}")
    verification = verify(searcher, result, args)
    report = result.to_dict()
    if diagnosis is not None:
        report["start_from"] = {"path": args.start_from, **diagnosis.to_dict()}
    report.update({"model": args.model, "verification": verification, "recipe": result.recipe.to_dict(),
                   "wall_seconds": round(time.perf_counter() - t0, 1)})
    print_verification(verification, result)
    if spec.name == "tasks":
        print_task_accuracy(result)
        say(f"note: these accuracies are on the items that chose the plan (seed {cfg.metric_seed}); report the plan "
            f"with `qdoctor eval --tasks {','.join(spec.tasks)} --recipe PLAN --subsample N --task-seed S` "
            f"using another seed S (or all items)")
    if not result.met:
        if spec.name == "ppl":
            say(f"qdoctor: budget NOT met: best plan is {result.best.delta_pct:+.2f}% on held-out text "
                f"(budget {budget}%); the best plan found is shown and written")
        else:
            say(f"qdoctor: budget NOT met: best plan is {result.best.delta:+.2f} points of mean accuracy "
                f"(budget −{budget} points); the best plan found is shown and written")
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


def load_scan(path: str, cfg) -> tuple:
    """(ScanReport, CalibrationStats) of a scan saved with ``--for-fix``, checked against ``cfg``.
    The statistics file is looked up beside the JSON by its bare name (never a path from the file)."""
    from pathlib import Path

    from qdoctor.calib.collect import CalibrationStats
    from qdoctor.policy.search import check_scan_matches
    from qdoctor.report.json import read_json

    report = read_json(path)
    name = report.statistics
    if not name:
        raise QDoctorError(f"{path}: the scan saved no calibration statistics; re-run it with --for-fix")
    if Path(name).name != name:
        raise QDoctorError(f"{path}: bad statistics file name {name!r} (a bare file name beside the JSON)")
    stats = CalibrationStats.load(str(Path(path).parent / name))
    return check_scan_matches((report, stats), cfg)


def verify(searcher, result, args) -> dict:
    """FP, naive and planned perplexity on the WikiText-2 test split (``--limit`` windows)
    (``policy.verify.verify_perplexities``)."""
    from qdoctor.policy.verify import verify_perplexities

    return verify_perplexities(searcher, result.best.plan, args.seqlen, args.limit)


def _acc(v: float) -> str:
    return f"{100.0 * v:.2f}"


def print_trials(result) -> None:
    from rich.console import Console
    from rich.table import Table

    m = result.metric
    if result.metric_name == "ppl":
        title = f"plans tried on held-out text (FP PPL {result.fp_ppl:.3f}, budget +{result.config.budget_pct}%)"
        tasks, head = [], "PPL"
    else:
        tasks = list(m.get("tasks", {}))
        title = (f"plans tried on {', '.join(tasks)} ({m.get('items_per_task')} items/task, seed {m.get('seed')}; "
                 f"FP mean acc {_acc(result.fp_value)}, budget −{result.config.budget_pct} points)")
        head = "mean acc"
    t = Table(title=title)
    cols = ["plan", head, "Δ vs FP", *(tasks if len(tasks) > 1 else []), "kept", "per-group", "cost", "s"]
    for c in cols:
        t.add_column(c, justify="left" if c == "plan" else "right")
    for tr in result.trials:
        mark = " ◀" if tr is result.best else ""
        if result.metric_name == "ppl":
            cells = [f"{tr.ppl:.3f}", f"{tr.delta_pct:+.2f}%"]
        else:
            cells = [_acc(tr.value), f"{tr.delta:+.2f} pts"]
            if len(tasks) > 1:
                cells += [_acc(tr.details[k]) if k in tr.details else "—" for k in tasks]
        cost = "—" if tr.cost is None else f"{tr.cost:.2f}"  # GEMM time vs BF16 (serve.cost); — : no table
        t.add_row(tr.label + mark, *cells, str(tr.kept), str(tr.per_group), cost, f"{tr.seconds:.0f}")
    Console(width=160 if len(tasks) > 1 else 120).print(t)


def plan_cost_text(result) -> str:
    c = result.cost or {}
    if c.get("speedup_vs_bf16") is None:
        return c.get("why") or "no GEMM table"
    return (f"{c['speedup_vs_bf16']:.2f}× BF16 on the linear layers' GEMMs at M = {c['M']} "
            f"(bench/gemm.py table; attention and the rest not counted)")


def print_skipped(result) -> None:
    """The candidates the serving profile ruled out, one line each."""
    for sk in result.skipped:
        say(f"not tried on {result.config.profile.describe()}: {sk['label']} — {sk['violations'][0]}"
            + (f" (+{len(sk['violations']) - 1} more)" if len(sk["violations"]) > 1 else ""))


def print_task_accuracy(result) -> None:
    """FP vs naive vs plan accuracy per task, as measured by the search (its selection items)."""
    from rich.console import Console
    from rich.table import Table

    m = result.metric
    t = Table(title=f"zero-shot acc on the plan-selection items ({m.get('items_per_task')} per task, "
                    f"seed {m.get('seed')})")
    for c in ("task", "items", "full precision", f"naive {result.config.target}", f"plan: {result.best.label}"):
        t.add_column(c, justify="left" if c == "task" else "right")

    def cell(value: float, ref: float) -> str:
        return f"{_acc(value)} ({100.0 * (value - ref):+.2f})"

    for task, info in m.get("tasks", {}).items():
        fp = result.fp_details[task]
        t.add_row(task, f"{info['items']}/{info['of']}", _acc(fp), cell(result.naive.details[task], fp),
                  cell(result.best.details[task], fp))
    t.add_row("mean", "", _acc(result.fp_value), cell(result.naive.value, result.fp_value),
              cell(result.best.value, result.fp_value))
    Console(width=140).print(t)


def print_diagnosis(d, path: str) -> None:
    """Why the start recipe loses: its measured loss and the layers the scan's evidence blames."""
    from rich.console import Console
    from rich.table import Table

    value = f"{d.delta:+.2f}{'%' if d.unit == '%' else ' points'}"
    t = Table(title=f"why {path} loses on this model: {value} vs full precision on the held-out "
                    f"{'text' if d.unit == '%' else 'items'}; {len(d.layers)} layer(s) flagged")
    for c in ("layer", "its scheme", "smoothed", "evidence"):
        t.add_column(c)
    for x in d.layers[:20]:
        t.add_row(x.name, x.scheme, "yes" if x.smoothed else "no", "; ".join(x.reasons))
    if len(d.layers) > 20:
        t.add_row(f"… {len(d.layers) - 20} more (see --json)", "", "", "")
    Console(width=160).print(t)


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
