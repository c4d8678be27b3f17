"""``qdoctor scan``: find each linear layer's W8A8 weak spots (weight outliers, activation spikes)."""

from __future__ import annotations

import time

from qdoctor.cli.common import add_calib_args, add_model_args, add_stream_arg, calib_config, environment, load_model, \
    positive_int, refuse_unused, require_parent, say
from qdoctor.errors import QDoctorError


def register(sub) -> None:
    p = sub.add_parser("scan", help="find weight-outlier and activation-spike layers; JSON/HTML/Markdown report",
                       description="Stream the calibration set through the model one block at a time and report, "
                                   "per linear layer, weight outliers, activation spikes and INT8/FP8 quantization "
                                   "errors, with a verdict (see docs/scan.md).")
    add_model_args(p)
    add_stream_arg(p)
    add_calib_args(p)
    p.add_argument("--json", default=None, help="write the full report (schema qdoctor.scan/1) to this file")
    p.add_argument("--html", default=None, help="write a self-contained HTML report with plots to this file")
    p.add_argument("--markdown", default=None, help="also write the Markdown summary to this file")
    p.add_argument("--error-tokens", type=positive_int, default=1024,
                   help="uniform sample of calibration tokens for the error estimates, plus every spike token "
                        "(default 1024)")
    p.add_argument("--group-size", type=positive_int, default=128,
                   help="INT8 weight group size; the largest divisor of K below it when it does not divide K "
                        "(default 128)")
    p.add_argument("--spike-factor", type=float, default=None,
                   help="a token spikes when its absmax > factor × its sample's median token absmax (default 10)")
    p.add_argument("--spike-ratio", type=float, default=None,
                   help="activation-spike verdict above this spike ratio (default 10)")
    p.add_argument("--weight-dim-ratio", type=float, default=None,
                   help="weight-outlier verdict needs max/median input-dim |W| above this (default 25) …")
    p.add_argument("--weight-error", type=float, default=None,
                   help="… and per-channel INT8 weight-only output error above this fraction (default 0.01)")
    p.add_argument("--sensitivity", choices=("layer", "projection"), default=None,
                   help="also measure the PPL change when only one layer / one projection type is quantized (slow)")
    p.add_argument("--sensitivity-scheme", default="w8a8-channel-tensor-static",
                   help="scheme for --sensitivity (default w8a8-channel-tensor-static)")
    p.add_argument("--sensitivity-windows", type=positive_int, default=2, help="PPL windows for --sensitivity (default 2)")
    p.add_argument("--sensitivity-seqlen", type=positive_int, default=512,
                   help="PPL window length for --sensitivity (default 512)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads for the block forwards (default: torch's choice); the per-layer "
                        "statistics always use one (see docs/scan.md)")
    p.add_argument("--for-fix", action="store_true",
                   help="calibrate as `qdoctor fix` does (the last 20%% of the calibration text held out, "
                        "--sample-rows rows kept per input) and save the statistics beside --json, so that "
                        "`qdoctor fix --scan JSON` skips its own calibration")
    p.add_argument("--sample-rows", type=positive_int, default=512,
                   help="with --for-fix: calibration rows kept per input (default 512, as `qdoctor fix`)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


SENSITIVITY_ONLY = ("sensitivity_scheme", "sensitivity_windows", "sensitivity_seqlen")


def statistics_path(json_path: str) -> str:
    """Where the statistics of a scan saved as ``json_path`` go: ``<json stem>.stats.safetensors``
    beside it."""
    from pathlib import Path

    p = Path(json_path)
    return str(p.with_name(p.stem + ".stats.safetensors"))


def scan_config(args):
    from qdoctor.quant.spec import get_scheme
    from qdoctor.scan.config import ScanConfig, Thresholds

    if args.sensitivity:
        get_scheme(args.sensitivity_scheme)  # fail before loading the model
    else:
        refuse_unused(args, SENSITIVITY_ONLY, "only apply with --sensitivity layer|projection")
    if not args.for_fix:
        refuse_unused(args, ("sample_rows",), "only applies with --for-fix (the rows a fix keeps per input)")
    defaults = Thresholds()
    thresholds = Thresholds(
        weight_error=args.weight_error if args.weight_error is not None else defaults.weight_error,
        weight_dim_ratio=args.weight_dim_ratio if args.weight_dim_ratio is not None else defaults.weight_dim_ratio,
        spike_ratio=args.spike_ratio if args.spike_ratio is not None else defaults.spike_ratio)
    kwargs = {}
    if args.spike_factor is not None:
        kwargs["spike_factor"] = args.spike_factor
    cal = calib_config(args)
    if args.for_fix:
        from dataclasses import replace

        from qdoctor.policy.search import FixConfig

        if not args.json:
            raise QDoctorError("--for-fix saves the statistics beside the report: give --json")
        cal = replace(cal, sample_rows=args.sample_rows, holdout_fraction=FixConfig().calibration.holdout_fraction)
    return ScanConfig(calibration=cal, thresholds=thresholds, group_size=args.group_size,
                      error_tokens=args.error_tokens, sensitivity=args.sensitivity,
                      sensitivity_scheme=args.sensitivity_scheme, sensitivity_windows=args.sensitivity_windows,
                      sensitivity_seqlen=args.sensitivity_seqlen, progress=not args.quiet, **kwargs)


def run(args) -> int:
    from qdoctor.io import atomic_write_text, peak_rss_mb
    from qdoctor.report.html import write_html
    from qdoctor.report.json import write_json
    from qdoctor.report.markdown import render_markdown
    from qdoctor.scan.run import scan_with_stats

    config = scan_config(args)
    for path in (args.json, args.html, args.markdown):
        require_parent(path)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load_model(args)
    say(f"scanning {args.model}: {config.calibration.n_samples} × {config.calibration.seqlen} calibration tokens, "
        "one block at a time …")
    report, stats = scan_with_stats(model, tok, config)
    report.timing["wall_seconds"] = round(time.perf_counter() - t0, 1)
    report.timing["peak_rss_mb"] = round(peak_rss_mb(), 1)
    report.environment = environment()
    md = render_markdown(report)
    print(md)
    if args.json:
        if args.for_fix:
            from pathlib import Path

            stats.save(statistics_path(args.json))
            report.statistics = Path(statistics_path(args.json)).name
            say(f"wrote {statistics_path(args.json)} (calibration statistics for `qdoctor fix --scan {args.json}`)")
        write_json(report, args.json)
        say(f"wrote {args.json}")
    if args.html:
        write_html(report, args.html)
        say(f"wrote {args.html}")
    if args.markdown:
        atomic_write_text(args.markdown, md)
        say(f"wrote {args.markdown}")
    return 0
