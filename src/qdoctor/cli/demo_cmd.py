"""``qdoctor demo``: the README's main job — FP vs the five reference schemes on the default model."""

from __future__ import annotations

import time

from qdoctor.cli.common import add_calib_args, add_model_args, add_ppl_args, load_model, require_parent, say
from qdoctor.cli.eval_cmd import build_report, print_table, run_table


def register(sub) -> None:
    p = sub.add_parser("demo", help="FP vs the five reference W8A8/FP8 schemes on a few windows (minutes on 2 cores)")
    add_model_args(p)
    add_ppl_args(p, limit=4)
    add_calib_args(p, samples=32)
    p.add_argument("--json", default=None, help="write the results as JSON to this file")
    p.set_defaults(func=run)


def run(args) -> int:
    from qdoctor.quant.spec import TABLE_SCHEMES, get_scheme

    require_parent(args.json)
    t0 = time.perf_counter()
    model, tok = load_model(args)
    rows = run_table(model, tok, [get_scheme(s) for s in TABLE_SCHEMES], args)
    report = build_report(args, rows, time.perf_counter() - t0)
    report["command"] = "demo"
    print_table(report)
    if args.json:
        from qdoctor.io import atomic_write_json

        atomic_write_json(args.json, report)
        say(f"wrote {args.json}")
    return 0
