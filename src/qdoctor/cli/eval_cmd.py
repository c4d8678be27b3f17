"""``qdoctor eval``: perplexity of the full-precision model vs one or more quantization schemes."""

from __future__ import annotations

import time

from qdoctor.cli.common import (
    add_calib_args,
    add_model_args,
    add_ppl_args,
    calib_config,
    environment,
    load_model,
    require_parent,
    say,
    split_list,
)
from qdoctor.errors import QDoctorError


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity: full precision vs quantization schemes",
                       description="Measure WikiText-2 perplexity of the full-precision model and of each scheme.")
    add_model_args(p)
    p.add_argument("--scheme", action="append", default=None,
                   help="named scheme (repeat or comma-separate; default w8a8-channel-token). "
                        "See `qdoctor models --schemes`")
    p.add_argument("--scheme-file", default=None, help="a scheme as JSON/YAML (see docs/schemes.md)")
    add_ppl_args(p)
    add_calib_args(p)
    p.add_argument("--json", default=None, help="write the results as JSON to this file")
    p.set_defaults(func=run)


def resolve_schemes(args) -> list:
    from qdoctor.quant.spec import get_scheme

    names: list[str] = []
    for s in args.scheme or ([] if args.scheme_file else ["w8a8-channel-token"]):
        names.extend(split_list(s))
    schemes = [get_scheme(n) for n in names]
    if args.scheme_file:
        from qdoctor.quant.schemefile import load_scheme_file

        schemes.append(load_scheme_file(args.scheme_file))
    if not schemes:
        raise QDoctorError("no scheme given")
    return schemes


def run(args) -> int:
    schemes = resolve_schemes(args)
    require_parent(args.json)
    t0 = time.perf_counter()
    model, tok = load_model(args)
    rows = run_table(model, tok, schemes, args)
    report = build_report(args, rows, time.perf_counter() - t0)
    print_table(report)
    if args.json:
        from qdoctor.io import atomic_write_json

        atomic_write_json(args.json, report)
        say(f"wrote {args.json}")
    return 0


def run_table(model, tok, schemes, args):
    from qdoctor.api import compare_schemes

    results, calib = compare_schemes(model, tok, schemes, seqlen=args.seqlen, limit=args.limit, source=args.text,
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
