"""The Markdown summary of a scan (printed to the terminal; GitHub-renderable)."""

from __future__ import annotations

from qdoctor.scan.findings import ScanReport

MAX_ROWS = 25


def pct(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{100 * v:.{digits}f}%"


def num(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def _spike_where(f, k: int = 3) -> str:
    a = f.activation
    if not a.spike_tokens:
        return "—"
    pos = ", ".join(f"{p}×{c}" for p, c in list(a.spike_positions.items())[:k])
    toks = ", ".join(f"{a.spike_token_text.get(t, t)!r}×{c}" for t, c in list(a.spike_token_ids.items())[:k])
    chans = ", ".join(str(int(c)) for c, _ in a.spike_channels[:k])
    return f"pos {pos}; tokens {toks}; channels {chans}"


def render_markdown(report: ScanReport, max_rows: int = MAX_ROWS) -> str:
    m = report.model
    cal = report.config.get("calibration", {})
    thr = report.config.get("thresholds", {})
    out = [f"# qdoctor scan · {m.get('source') or m.get('class')}", ""]
    out.append(f"{m.get('class')} ({m.get('family')}), {m.get('blocks')} blocks, {m.get('linear_layers')} linear layers · "
               f"calibration {cal.get('n_samples')} × {cal.get('seqlen')} tokens of {cal.get('source')} "
               f"(seed {cal.get('seed')}) · errors on ≤ {report.config.get('error_tokens')} sampled tokens + spike "
               f"tokens per layer")
    out.append("")
    for line in report.summary.lines:
        out.append(f"- {line}")
    c = report.summary.counts
    out += ["", f"Verdicts: ok {c.get('ok', 0)} · weight-outlier {c.get('weight-outlier', 0)} · activation-spike "
                f"{c.get('activation-spike', 0)} · both {c.get('both', 0)}  "
                f"(thresholds: weight-outlier = max/median input-dim |W| > {thr.get('weight_dim_ratio'):g} and per-channel "
                f"INT8 weight-only output error > {pct(thr.get('weight_error'), 0)}; activation-spike = spike ratio > "
                f"{thr.get('spike_ratio'):g})", ""]
    flagged = report.flagged()
    if flagged:
        flagged = sorted(flagged, key=lambda f: (f.verdict, -f.spike_ratio, -f.errors["out_w_channel"]))
        out += ["## Flagged layers", "",
                "| layer | verdict | max\\|W\\| | W max/med | W-ch err | W-grp err | spike ratio | input max | "
                "A static INT8 (typical token) | A token INT8 | spikes at |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for f in flagged[:max_rows]:
            e = f.errors
            out.append(f"| {f.name} | {f.verdict} | {num(f.weight.max_abs)} | {num(f.weight.max_median_ratio)} | "
                       f"{pct(e['out_w_channel'])} | {pct(e['out_w_group'])} | {num(f.spike_ratio)} | "
                       f"{num(f.activation.max_token_max)} | {pct(e['out_a_tensor_static_int8'], 1)} "
                       f"({pct(f.activation.typical_token_errors.get('tensor_static_int8'), 0)}) | "
                       f"{pct(e['out_a_token_dynamic_int8'])} | {_spike_where(f)} |")
        if len(flagged) > max_rows:
            out.append(f"| … {len(flagged) - max_rows} more (see the JSON/HTML report) | | | | | | | | | | |")
        out.append("")
    worst = sorted(report.layers, key=lambda f: -f.errors["out_a_tensor_static_int8"])[:5]
    out += ["## Largest per-tensor static INT8 activation errors (W exact)", "",
            "| layer | verdict | static INT8 | dynamic tensor INT8 | dynamic token INT8 | static FP8 | token FP8 |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for f in worst:
        e = f.errors
        out.append(f"| {f.name} | {f.verdict} | {pct(e['out_a_tensor_static_int8'], 1)} | "
                   f"{pct(e['out_a_tensor_dynamic_int8'], 1)} | {pct(e['out_a_token_dynamic_int8'])} | "
                   f"{pct(e['out_a_tensor_static_fp8'])} | {pct(e['out_a_token_dynamic_fp8'])} |")
    if report.sensitivity:
        s = report.sensitivity
        top = sorted(s["results"].items(), key=lambda kv: -kv[1]["delta_pct"])[:10]
        out += ["", f"## Sensitivity ({s['scheme']} on one {s['mode']} at a time; {s['windows']} × {s['seqlen']} "
                    f"tokens of {s['source']}, full-precision PPL {s['baseline_ppl']:.3f})", "",
                "| quantized alone | PPL | Δ |", "|---|---:|---:|"]
        for key, r in top:
            out.append(f"| {key} | {r['ppl']:.3f} | {r['delta_pct']:+.2f}% |")
    t = report.timing
    if t:
        out += ["", f"Scan time {t.get('scan_seconds', 0):.1f}s · peak RSS {t.get('peak_rss_mb', 0):.0f} MiB"]
    return "\n".join(out) + "\n"
