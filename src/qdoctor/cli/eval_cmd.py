"""``qdoctor eval``: perplexity of the full-precision model vs one or more quantization schemes."""

from __future__ import annotations

import time

from qdoctor.cli.common import (
    CALIB_OPTIONS,
    add_calib_args,
    add_model_args,
    add_ppl_args,
    add_stream_arg,
    calib_config,
    environment,
    load_model,
    positive_int,
    read_recipe,
    refuse_unused,
    require_parent,
    say,
    split_list,
    was_given,
)
from qdoctor.errors import QDoctorError


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity: full precision vs quantization schemes",
                       description="Measure WikiText-2 perplexity of the full-precision model and of each scheme.")
    add_model_args(p)
    add_stream_arg(p)
    p.add_argument("--scheme", action="append", default=None,
                   help="named scheme (repeat or comma-separate; default w8a8-channel-token). "
                        "See `qdoctor models`")
    p.add_argument("--scheme-file", default=None, help="a scheme as JSON/YAML (see docs/schemes.md)")
    p.add_argument("--recipe", default=None, help="a recipe from `qdoctor fix` or an llm-compressor recipe "
                                                  "(evaluated like a scheme; docs/fix.md)")
    add_ppl_args(p, limit_help="perplexity: the first N windows (default: all); with --tasks: the first N items "
                               "of each task, as lm-eval's --limit")
    p.add_argument("--tasks", default=None,
                   help="zero-shot tasks instead of perplexity: comma list or 'all' (piqa, arc_easy, arc_challenge, "
                        "hellaswag, winogrande, boolq, openbookqa, lambada_openai)")
    p.add_argument("--task-limit", type=positive_int, default=None,
                   help="first N items of each task (the same as --limit with --tasks)")
    p.add_argument("--subsample", type=positive_int, default=None, help="N items per task drawn with --task-seed")
    p.add_argument("--task-seed", type=int, default=1234, help="subsample seed (default 1234)")
    p.add_argument("--task-data", default=None, help="folder with your own <task>.jsonl files (docs/zeroshot.md)")
    add_calib_args(p)
    p.add_argument("--json", default=None, help="write the results as JSON to this file")
    p.set_defaults(func=run)


def resolve_schemes(args) -> list:
    from qdoctor.quant.spec import get_scheme

    names: list[str] = []
    for s in args.scheme or ([] if (args.scheme_file or args.recipe) else ["w8a8-channel-token"]):
        names.extend(split_list(s))
    schemes = [get_scheme(n) for n in names]
    if args.scheme_file:
        from qdoctor.quant.schemefile import load_scheme_file

        schemes.append(load_scheme_file(args.scheme_file))
    if args.recipe:
        schemes.append(read_recipe(args.recipe))
    if not schemes:
        raise QDoctorError("no scheme given")
    return schemes


PPL_ONLY = ("seqlen", "text")
TASK_ONLY = ("task_limit", "subsample", "task_seed", "task_data")


def check_options(args, plans) -> None:
    """Refuse the options the chosen mode would ignore (one line each, before the model is loaded)."""
    from qdoctor.policy.recipe import Recipe

    if args.tasks:
        refuse_unused(args, PPL_ONLY, "only apply to perplexity windows; zero-shot tasks (--tasks) score whole "
                                      "items (use --limit N for the first N items of each task)")
        refuse_unused(args, ("stream",), "scores perplexity only: zero-shot tasks apply each plan to the whole "
                                         "model in memory")
        if was_given(args, "limit") and was_given(args, "task_limit") and args.limit != args.task_limit:
            raise QDoctorError(f"--limit {args.limit} and --task-limit {args.task_limit} disagree: with --tasks both "
                               "mean items per task; give one")
        if args.subsample is not None and (was_given(args, "limit") or was_given(args, "task_limit")):
            raise QDoctorError("give either --limit N (the first N items of each task) or --subsample N "
                               "(N items drawn with --task-seed), not both")
        if args.subsample is None:
            refuse_unused(args, ("task_seed",), "only applies with --subsample (it seeds the item draw)")
    else:
        refuse_unused(args, TASK_ONLY, "only apply with --tasks (zero-shot accuracy)")
    if not any(not isinstance(p, Recipe) and p.needs_calibration for p in plans):
        refuse_unused(args, CALIB_OPTIONS, "would be ignored: no scheme here is calibrated by them (dynamic "
                                           "schemes need no calibration; a recipe calibrates as its file says)")


def run(args) -> int:
    schemes = resolve_schemes(args)
    check_options(args, schemes)
    require_parent(args.json)
    if args.tasks:
        return run_tasks(args, schemes)
    t0 = time.perf_counter()
    model, tok = load_model(args)
    return finish(args, run_table(model, tok, schemes, args), t0)


def finish(args, rows, t0: float) -> int:
    """Print the perplexity table of ``rows`` and write it as JSON when asked (atomically)."""
    report = build_report(args, rows, time.perf_counter() - t0)
    print_table(report)
    if args.json:
        from qdoctor.io import atomic_write_json

        atomic_write_json(args.json, report)
        say(f"wrote {args.json}")
    return 0


def run_table(model, tok, schemes, args):
    """Perplexity of full precision vs each scheme or recipe (``api.compare_schemes``: every plan
    measured through the block pipeline, whole and block-streamed models alike)."""
    from qdoctor.api import compare_schemes

    results, _ = compare_schemes(model, tok, schemes, seqlen=args.seqlen, limit=args.limit, source=args.text,
                                 calib_config=calib_config(args))
    return results


def build_report(args, results, wall: float) -> dict:
    from qdoctor import __version__
    from qdoctor.io import peak_rss_mb

    fp = results[0].ppl.ppl
    return {
        "qdoctor_version": __version__,
        "command": "eval",
        "model": args.model,
        "text": args.text,
        "seqlen": args.seqlen,
        "windows": results[0].ppl.n_windows,
        "total_windows": results[0].ppl.total_windows,
        "calibration": {"samples": args.calib_samples, "seqlen": args.calib_seqlen, "source": args.calib_source,
                        "seed": args.seed},
        "results": [r.to_dict(fp) for r in results],
        "wall_seconds": round(wall, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "environment": environment(),
    }


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{report['model']} · WikiText-2 perplexity · {report['windows']}/{report['total_windows']} "
                    f"windows × {report['seqlen']} tokens")
    for col in ("scheme", "PPL", "Δ vs FP", "layers quantized", "kept", "time (s)"):
        t.add_column(col, justify="left" if col == "scheme" else "right")
    for r in report["results"]:
        delta = r.get("delta_pct")
        t.add_row(r["scheme"], f"{r['ppl']:.3f}", "—" if r["scheme"] == "full-precision" else f"{delta:+.2f}%",
                  str(r["quantized_layers"]), str(r["kept_layers"]), f"{r['seconds']:.1f}")
    Console(width=110).print(t)
    print(f"wall time {report['wall_seconds']:.1f}s · peak RSS {report['peak_rss_mb']:.0f} MiB")


def run_tasks(args, plans) -> int:
    """Zero-shot accuracy: full precision vs each scheme/recipe, with the delta and its standard error
    (√(se_fp² + se_q²), treating the two runs as independent: conservative for paired items)."""
    import math

    from qdoctor.eval.zeroshot import DEFAULT_TASKS, evaluate, get_task
    from qdoctor.policy.recipe import Recipe

    tasks = list(DEFAULT_TASKS) if args.tasks.strip() == "all" else split_list(args.tasks)
    for t in tasks:
        get_task(t)  # validate names before loading the model
    t0 = time.perf_counter()
    model, tok = load_model(args)
    kw = dict(tasks=tasks, limit=args.task_limit or args.limit, subsample=args.subsample, seed=args.task_seed,
              data_dir=args.task_data)
    runs = {"full-precision": evaluate(model, tok, **kw)}
    for plan in plans:
        recipe = Recipe.of(plan, calib_config(args))
        with recipe.applied(model, tok):
            runs[recipe.name] = evaluate(model, tok, **kw)
    rows = []
    fp = runs["full-precision"]
    for name, res in runs.items():
        for task, r in res.items():
            for metric in ("acc", "acc_norm", "perplexity"):
                if metric not in r.metrics:
                    continue
                v, se = r.metrics[metric], r.metrics.get(f"{metric}_stderr", float("nan"))
                row = {"plan": name, "task": task, "metric": metric, "value": v, "stderr": se, "items": r.n_items,
                       "seconds": round(r.seconds, 1)}
                if name != "full-precision":
                    f = fp[task].metrics
                    row["delta"] = v - f[metric]
                    row["delta_stderr"] = math.sqrt(se ** 2 + f.get(f"{metric}_stderr", float("nan")) ** 2)
                rows.append(row)
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{args.model} · zero-shot (lm-eval formats)")
    for c in ("task", "metric", "items", *runs.keys()):
        t.add_column(c, justify="left" if c in ("task", "metric") else "right")
    for task in tasks:
        for metric in ("acc", "acc_norm", "perplexity"):
            cells = []
            for name in runs:
                r = next((x for x in rows if x["plan"] == name and x["task"] == task and x["metric"] == metric), None)
                if r is None:
                    break
                scale = 1 if metric == "perplexity" else 100
                cell = f"{scale * r['value']:.2f}"
                if "delta" in r:
                    cell += f" ({scale * r['delta']:+.2f} ± {scale * r['delta_stderr']:.2f})"
                cells.append(cell)
            else:
                items = next(x["items"] for x in rows if x["task"] == task)
                t.add_row(task, metric, str(items), *cells)
    Console(width=160).print(t)
    if args.json:
        from qdoctor import __version__
        from qdoctor.io import atomic_write_json

        atomic_write_json(args.json, {"qdoctor_version": __version__, "command": "eval --tasks", "model": args.model,
                                      "limit": kw["limit"], "subsample": args.subsample,
                                      "task_seed": args.task_seed,  # the item sampler
                                      "rows": rows, "wall_seconds": round(time.perf_counter() - t0, 1)})
        say(f"wrote {args.json}")
    return 0
