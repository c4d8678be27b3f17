"""``qdoctor doctor MODEL --out DIR``: diagnose, treat, verify and export in one command, one
calibration pass, one report (``qdoctor.doctor``); this module parses arguments and prints the
one-screen summary."""

from __future__ import annotations

import time

from qdoctor.cli.common import add_model_args, add_serve_args, load_model, positive_int, say, serve_kwargs, split_list

# Defaults chosen so that `qdoctor doctor smollm2-135m` fits in minutes on 2 CPU cores (docs/doctor.md).
DEFAULTS = {"calib_samples": 32, "calib_seqlen": 512, "eval_windows": 2, "eval_seqlen": 1024, "test_windows": 2,
            "test_seqlen": 2048, "tasks": "piqa,arc_easy", "task_items": 100}


def register(sub) -> None:
    d = DEFAULTS
    p = sub.add_parser("doctor", help="diagnose, treat, verify and export in one command, with one HTML report",
                       description="Scan the model, search the cheapest plan meeting a perplexity budget on the "
                                   "scan's own calibration statistics, verify it (WikiText-2 test perplexity and "
                                   "zero-shot accuracy with standard errors), export it as a compressed-tensors "
                                   "checkpoint, check which runtimes serve it, and write everything into --out "
                                   "(built in a work folder beside it and renamed at the end).")
    add_model_args(p, positional=True)
    p.add_argument("--out", required=True, help="output folder (scan, recipe, checkpoint, report.html)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing doctor output folder at --out")
    p.add_argument("--target", default="w8a8-token",
                   help="target scheme: w8a8-token (INT8 per-channel weights, dynamic per-token activations: "
                        "llm-compressor's W8A8 preset; the default), w8a8-channel-static, w8a8-tensor-static or "
                        "any named scheme")
    p.add_argument("--budget", default="1.5%", help="allowed held-out perplexity increase over FP (default 1.5%%)")
    add_serve_args(p, "the checkpoint is for: the search never tries a plan it cannot run")
    p.add_argument("--max-layers", default="3%", help="at most this share of linear layers kept out of INT8 or "
                                                      "per-group (default 3%%)")
    p.add_argument("--keep", default="bf16", choices=["bf16", "fp16", "fp8"],
                   help="precision of layers kept out of INT8 (default bf16)")
    p.add_argument("--calib-samples", type=positive_int, default=d["calib_samples"],
                   help=f"calibration samples (default {d['calib_samples']})")
    p.add_argument("--calib-seqlen", type=positive_int, default=d["calib_seqlen"],
                   help=f"tokens per calibration sample (default {d['calib_seqlen']})")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")
    p.add_argument("--eval-windows", type=positive_int, default=d["eval_windows"],
                   help=f"held-out windows scoring each candidate plan (default {d['eval_windows']})")
    p.add_argument("--eval-seqlen", type=positive_int, default=d["eval_seqlen"],
                   help=f"held-out window length (default {d['eval_seqlen']})")
    p.add_argument("--test-windows", type=positive_int, default=d["test_windows"],
                   help=f"WikiText-2 test windows of the before/after table (default {d['test_windows']})")
    p.add_argument("--seqlen", type=positive_int, default=d["test_seqlen"],
                   help=f"test window length (default {d['test_seqlen']})")
    p.add_argument("--tasks", default=d["tasks"],
                   help=f"zero-shot tasks, comma-separated, or 'none' (default {d['tasks']})")
    p.add_argument("--task-items", type=positive_int, default=d["task_items"],
                   help=f"items drawn per task (default {d['task_items']})")
    p.add_argument("--task-seed", type=int, default=1234, help="seed of the item draw (default 1234)")
    p.add_argument("--save-dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="dtype of the checkpoint's unquantized tensors (default: the model's)")
    p.add_argument("--no-load-check", action="store_true",
                   help="do not load the written checkpoint with transformers to generate a few tokens")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def build_config(args):
    """The ``DoctorConfig`` of the arguments (every check that needs no model)."""
    from qdoctor.calib.collect import CalibrationConfig
    from qdoctor.cli.fix_cmd import parse_percent
    from qdoctor.doctor import DoctorConfig
    from qdoctor.eval.zeroshot import get_task
    from qdoctor.policy.search import FixConfig, resolve_target

    resolve_target(args.target)
    tasks = () if args.tasks.strip().lower() == "none" else tuple(split_list(args.tasks))
    for t in tasks:
        get_task(t)
    fix = FixConfig(target=args.target, budget_pct=parse_percent(args.budget),
                    max_layer_fraction=parse_percent(args.max_layers) / 100.0, keep=args.keep,
                    eval_windows=args.eval_windows, eval_seqlen=args.eval_seqlen,
                    calibration=CalibrationConfig(n_samples=args.calib_samples, seqlen=args.calib_seqlen,
                                                  seed=args.seed, sample_rows=FixConfig().calibration.sample_rows,
                                                  holdout_fraction=FixConfig().calibration.holdout_fraction),
                    **serve_kwargs(args))
    return DoctorConfig(fix=fix, test_windows=args.test_windows, test_seqlen=args.seqlen, tasks=tasks,
                        task_items=args.task_items, task_seed=args.task_seed,
                        save_dtype=args.save_dtype, load_check=not args.no_load_check, progress=not args.quiet)


def run(args) -> int:
    from qdoctor.doctor import MARKER, run_doctor
    from qdoctor.export.staging import check_out_dir

    config = build_config(args)
    check_out_dir(args.out, args.overwrite, MARKER)  # before the model is loaded
    t0 = time.perf_counter()
    model, tok = load_model(args)
    result = run_doctor(model, tok, config, args.out, source=args.model, overwrite=args.overwrite, say=say,
                        load_seconds=time.perf_counter() - t0)
    print_summary(result)
    return 0 if result.recovered else 3


def print_summary(r, width: int = 110) -> None:
    """The one-screen terminal summary of a ``DoctorResult``."""
    from rich.console import Console, Group
    from rich.panel import Panel
    from rich.table import Table

    from qdoctor.report.doctor_html import worst_layers

    v, fix, scan = r.verification, r.fix, r.scan
    c = scan.summary.counts
    diag = Table.grid(padding=(0, 1))
    diag.add_row("[bold]diagnosis[/]", f"{c.get('weight-outlier', 0)} weight-outlier, "
                 f"{c.get('activation-spike', 0)} activation-spike, {c.get('both', 0)} both, of {scan.summary.layers}")
    for f in worst_layers(scan, limit=2):
        diag.add_row("", f"{f.name}: {f.verdict} (per-channel INT8 weight-only error "
                     f"{100 * f.errors['out_w_channel']:.2f}%, spike ratio {f.spike_ratio:.3g})")
    plan = Table.grid(padding=(0, 1))
    plan.add_row("[bold]plan[/]", f"{fix.best.label} ({fix.best.kept} kept, {fix.best.per_group} per-group of "
                 f"{fix.total_layers}; held-out {fix.best.delta_pct:+.2f}%, budget +{fix.config.budget_pct:g}% "
                 + ("met" if fix.met else "[red]NOT met[/]") + ")")
    for s in r.steps[1:6]:
        plan.add_row("", f"{s.what.split(':')[0]} on {', '.join(s.layers)[:50]} — {s.cost.split(':')[0]}")
    ppl = Table(title=f"WikiText-2 test, {v['windows']} × {v['seqlen']} tokens", title_justify="left")
    for col in ("", "PPL", "Δ vs FP"):
        ppl.add_column(col, justify="left" if not col else "right")
    ppl.add_row("full precision", f"{v['fp_ppl']:.3f}", "—")
    ppl.add_row(f"naive {fix.config.target}", f"{v['naive_ppl']:.3f}", f"{v['naive_delta_pct']:+.2f}%")
    ppl.add_row("plan", f"{v['planned_ppl']:.3f}", f"{v['planned_delta_pct']:+.2f}%")
    parts = [diag, plan, ppl]
    if r.tasks:
        tasks = Table(title="zero-shot acc % (± s.e.)", title_justify="left")
        for col in ("task", "items", "FP", "plan", "Δ (paired)"):
            tasks.add_column(col, justify="left" if col == "task" else "right")
        for t in r.tasks:
            tasks.add_row(t.task, str(t.items), f"{100 * t.fp_acc:.1f} ± {100 * t.fp_stderr:.1f}",
                          f"{100 * t.plan_acc:.1f} ± {100 * t.plan_stderr:.1f}",
                          f"{100 * t.delta:+.1f} ± {100 * t.delta_stderr:.1f}")
        parts.append(tasks)
    rt = Table.grid(padding=(0, 1))
    for x in r.runtimes:
        mark = "[green]serves[/]" if x.serves else "[red]no[/]" if x.serves is False else "not checked"
        rt.add_row(f"[bold]{x.runtime}[/]", mark, f"({x.how})", (x.sample or x.detail)[:70])
    parts.append(rt)
    phases = " · ".join(f"{k} {s:.0f}s" for k, s in r.phases.items())
    parts.append(f"[dim]{phases} · peak RSS {r.peak_rss_mb:.0f} MiB[/]")
    parts.append(f"[bold]open {r.out_dir}/{r.files['report']}[/] · checkpoint {r.out_dir}/{r.files['checkpoint']}")
    Console(width=width, stderr=False).print(Panel(Group(*parts), title=f"qdoctor doctor · {r.model}"))
    if not fix.met:
        say(f"qdoctor: budget NOT met: best plan is {fix.best.delta_pct:+.2f}% on held-out text (budget "
            f"{fix.config.budget_pct:g}%); it is written all the same")
