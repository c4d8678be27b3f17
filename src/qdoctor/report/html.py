"""A self-contained HTML scan report: summary, plots (PNG, base64-embedded), tables. No external
assets, scripts or fonts: the file can be mailed or attached to an issue as is."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from qdoctor.io import atomic_write_text
from qdoctor.report import plots
from qdoctor.report.markdown import num, pct
from qdoctor.scan.findings import ScanReport

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1340px;color:#222;
     padding:0 16px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:30px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#555;font-size:13px}
.summary{background:#fff8e6;border-left:5px solid #f0a500;padding:10px 16px;margin:16px 0;font-size:15px}
.summary.clean{background:#eef8ee;border-left-color:#3a3}
.summary li{margin:4px 0}
.badges span{display:inline-block;padding:3px 10px;border-radius:12px;margin-right:6px;font-size:13px;color:#fff}
.v-ok{background:#888}.v-weight-outlier{background:#d62728}.v-activation-spike{background:#e67e00}.v-both{background:#9467bd}
table{border-collapse:collapse;font-size:12.5px;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right;vertical-align:top}
th{background:#f4f4f4} td.l,th.l{text-align:left}
tr.flag-weight-outlier td:first-child{border-left:4px solid #d62728}
tr.flag-activation-spike td:first-child{border-left:4px solid #e67e00}
tr.flag-both td:first-child{border-left:4px solid #9467bd}
td.bad{background:#fde2e2} td.warn{background:#fff1d6}
img{max-width:100%;display:block;margin:6px 0 14px 0}
.note{color:#555;font-size:12.5px;max-width:1100px}
details summary{cursor:pointer;font-weight:600;margin:10px 0}
code{background:#f4f4f4;padding:1px 4px;border-radius:3px}
"""


def img_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _e(x) -> str:
    return html.escape(str(x))


def _cls(v: float | None, bad: float, warn: float) -> str:
    if v is None:
        return ""
    return ' class="bad"' if v > bad else ' class="warn"' if v > warn else ""


def _spike_cell(f) -> str:
    a = f.activation
    if not a.spike_tokens:
        return "—"
    pos = ", ".join(f"{_e(p)}×{c}" for p, c in list(a.spike_positions.items())[:4])
    toks = ", ".join(f"<code>{_e(repr(a.spike_token_text.get(t, t)))}</code>×{c}"
                     for t, c in list(a.spike_token_ids.items())[:4])
    chans = ", ".join(f"{int(c)} ({num(v)})" for c, v in a.spike_channels[:4])
    return (f"{a.spike_tokens} tokens in {a.spike_samples}/{a.samples} samples<br>positions {pos}<br>"
            f"tokens {toks}<br>channels {chans}")


def _layer_rows(findings, thr, detail: bool) -> str:
    rows = []
    for f in findings:
        e = f.errors
        w = f.weight
        typ = f.activation.typical_token_errors.get("tensor_static_int8")
        cells = [
            f'<td class="l">{_e(f.name)}</td>',
            f'<td class="l"><span class="badge">{_e(f.verdict)}</span></td>',
            f"<td{_cls(w.max_median_ratio, thr['weight_dim_ratio'], thr['weight_dim_ratio'] / 2)}>{num(w.max_abs)}</td>",
            f"<td>{num(w.max_median_ratio)}</td>",
            f"<td class=\"l\">{', '.join(f'{int(j)} ({num(v)})' for j, v in w.top_dims[:3])}</td>",
            f"<td{_cls(e['out_w_channel'], thr['weight_error'], thr['weight_error'] / 2)}>{pct(e['out_w_channel'])}</td>",
            f"<td>{pct(e['out_w_group'])} <small>(g={w.group_size})</small></td>",
            f"<td>{pct(e['out_w_tensor'])}</td>",
            f"<td{_cls(f.spike_ratio, thr['spike_ratio'], thr['spike_ratio'] / 2)}>{num(f.spike_ratio)}</td>",
            f"<td>{num(f.activation.max_token_max)}</td>",
            f"<td>{num(f.activation.median_token_max)}</td>",
            f"<td{_cls(e['out_a_tensor_static_int8'], 0.05, 0.01)}>{pct(e['out_a_tensor_static_int8'], 1)}</td>",
            f"<td{_cls(typ, 0.05, 0.01)}>{pct(typ, 0)}</td>",
            f"<td{_cls(e['out_a_tensor_dynamic_int8'], 0.05, 0.01)}>{pct(e['out_a_tensor_dynamic_int8'], 1)}</td>",
            f"<td{_cls(e['out_a_token_dynamic_int8'], 0.05, 0.01)}>{pct(e['out_a_token_dynamic_int8'])}</td>",
            f"<td>{pct(e['out_a_tensor_static_fp8'])}</td>",
            f"<td>{pct(e['out_a_token_dynamic_fp8'])}</td>",
        ]
        if f.sensitivity:
            d = f.sensitivity.get("delta_pct", f.sensitivity.get("projection_delta_pct"))
            cells.append(f"<td>{d:+.2f}%</td>")
        if detail:
            cells.append(f'<td class="l">{_spike_cell(f)}</td>')
        rows.append(f'<tr class="flag-{_e(f.verdict)}">' + "".join(cells) + "</tr>")
    return "\n".join(rows)


def _layer_table(findings, thr, detail: bool, sens: bool) -> str:
    head = ["layer", "verdict", "max|W|", "W max/med dim", "top input dims", "W-only err ch", "W-only err grp",
            "W-only err tensor", "spike ratio", "input max", "median token", "A static INT8",
            "typical token A static INT8", "A dyn-tensor INT8",
            "A dyn-token INT8", "A static FP8", "A dyn-token FP8"]
    if sens:
        head.append("ΔPPL alone")
    if detail:
        head.append("spikes (where)")
    ths = "".join(f'<th class="{"l" if h in ("layer", "verdict", "top input dims", "spikes (where)") else ""}">'
                  f"{_e(h)}</th>" for h in head)
    return f"<table><tr>{ths}</tr>\n{_layer_rows(findings, thr, detail)}</table>"


def render_html(report: ScanReport) -> str:
    """The whole page as one string."""
    m = report.model
    cfg = report.config
    cal = cfg.get("calibration", {})
    thr = cfg.get("thresholds", {})
    layers = report.layers
    flagged = report.flagged()
    spikes = [f for f in layers if f.activation_spike]
    weights = [f for f in layers if f.weight_outlier]
    title = f"qdoctor scan · {m.get('source') or m.get('class')}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{CSS}</style>"
             f"</head><body><h1>{_e(title)}</h1>"]
    parts.append(f"<div class='meta'>{_e(m.get('class'))} · family {_e(m.get('family'))} · {m.get('blocks')} blocks · "
                 f"{m.get('linear_layers')} linear layers · {_e(m.get('dtype'))} · calibration {cal.get('n_samples')} × "
                 f"{cal.get('seqlen')} tokens of {_e(cal.get('source'))} (seed {cal.get('seed')}) · quantization errors on "
                 f"≤ {cfg.get('error_tokens')} sampled tokens + every spike token per layer · qdoctor "
                 f"{_e(report.qdoctor_version)} · schema qdoctor.scan/1</div>")
    clean = " clean" if not flagged else ""
    parts.append(f"<div class='summary{clean}'><ul>" + "".join(f"<li>{_e(s)}</li>" for s in report.summary.lines)
                 + "</ul></div>")
    c = report.summary.counts
    parts.append("<div class='badges'>" + "".join(
        f"<span class='v-{v}'>{v}: {c.get(v, 0)}</span>" for v in ("ok", "weight-outlier", "activation-spike", "both"))
        + "</div>")
    parts.append(f"<p class='note'>Verdicts: <b>weight-outlier</b> when the largest input-dimension |W| exceeds "
                 f"{thr.get('weight_dim_ratio'):g}× the median one and the per-channel INT8 weight-only output error "
                 f"‖XWᵀ − XQ(W)ᵀ‖/‖XWᵀ‖ exceeds {pct(thr.get('weight_error'), 0)}; <b>activation-spike</b> when the spike "
                 f"ratio (mean over samples of max/median token absmax) exceeds {thr.get('spike_ratio'):g}. "
                 f"A token spikes when its absmax exceeds {cfg.get('spike_factor'):g}× its sample's median. "
                 f"Red outlines below mark flagged cells.</p>")

    parts.append("<h2>Where: block × projection</h2>")
    parts.append(img_tag(plots.heatmap(layers, lambda f: f.spike_ratio, "Activation spike ratio (max / median token "
                                    "absmax of the layer input)", flagged=lambda f: f.activation_spike,
                                    cbar_label="spike ratio"), "spike ratio heatmap"))
    parts.append(img_tag(plots.heatmap(layers, lambda f: f.activation.max_token_max, "Largest input activation |x|",
                                    flagged=lambda f: f.activation_spike, cbar_label="max |x|"),
                      "activation max heatmap"))
    parts.append(img_tag(plots.heatmap(layers, lambda f: f.weight.max_abs, "max|W|", flagged=lambda f: f.weight_outlier,
                                    cbar_label="max |W|"), "max|W| heatmap"))

    parts.append("<h2>How much: per-layer quantization error</h2>")
    parts.append(img_tag(plots.error_strip(layers, [("out_w_channel", "INT8 per-channel W"),
                                                 ("out_w_group", "INT8 per-group W"),
                                                 ("out_w_tensor", "INT8 per-tensor W")],
                                        thr.get("weight_error"), "Weight-only output error ‖XWᵀ − XQ(W)ᵀ‖/‖XWᵀ‖ "
                                        "(activations exact); shaded = flagged layer"), "weight error per layer"))
    parts.append(img_tag(plots.error_strip(layers, [("out_a_tensor_static_int8", "INT8 per-tensor static"),
                                                 ("out_a_tensor_dynamic_int8", "INT8 per-tensor dynamic"),
                                                 ("out_a_token_dynamic_int8", "INT8 per-token dynamic"),
                                                 ("out_a_tensor_static_fp8", "FP8 per-tensor static")],
                                        None, "Activation-only output error ‖XWᵀ − Q(X)Wᵀ‖/‖XWᵀ‖ (weights exact); "
                                        "shaded = flagged layer"), "activation error per layer"))
    focus = flagged[:12] if flagged else sorted(layers, key=lambda f: -f.errors["out_a_tensor_static_int8"])[:6]
    focus = sorted(focus, key=lambda f: (f.block, f.projection))
    parts.append(img_tag(plots.error_bars(focus, [("out_w_tensor", "W per-tensor"), ("out_w_channel", "W per-channel"),
                                               ("out_w_group", "W per-group"),
                                               ("out_a_tensor_static_int8", "A INT8 static"),
                                               ("out_a_tensor_dynamic_int8", "A INT8 dyn-tensor"),
                                               ("out_a_token_dynamic_int8", "A INT8 dyn-token"),
                                               ("out_a_tensor_static_fp8", "A FP8 static"),
                                               ("out_a_token_dynamic_fp8", "A FP8 dyn-token")],
                                     ("Flagged layers" if flagged else "Layers with the largest activation error")
                                     + ": every scheme's output error (INT8 weight-only, then activation-only)"),
                      "errors of flagged layers"))

    parts.append("<h2>Which tokens: activation magnitude per position</h2>")
    worst_spk = sorted(layers, key=lambda f: -f.spike_ratio)[:4]
    parts.append(img_tag(plots.token_profile(worst_spk, "Per-token max |x| of the 4 spikiest layer inputs (solid: max over "
                                                     "samples, dotted: median over samples)"), "token profile"))
    if spikes:
        parts.append(img_tag(plots.dim_profile(sorted(spikes, key=lambda f: -f.spike_ratio)[:4],
                                            "Which channels: per-channel input absmax of the spikiest layers",
                                            attr="activation"), "activation channel profile"))
    if weights:
        wl = sorted(weights, key=lambda f: -f.weight.max_median_ratio)[:4]
        parts.append("<h2>Which input dimensions: weight outliers</h2>")
        parts.append(img_tag(plots.dim_profile(wl, "Per-input-dimension max|W| of the worst weight-outlier layers"),
                          "weight dim profile"))

    sens = report.sensitivity is not None
    if flagged:
        parts.append(f"<h2>Flagged layers ({len(flagged)})</h2>")
        parts.append(_layer_table(sorted(flagged, key=lambda f: (f.block, f.projection)), thr, detail=True, sens=sens))
        for f in flagged:
            parts.append(f"<div class='note'><b>{_e(f.name)}</b>: {_e('; '.join(f.reasons))}</div>")
    if sens:
        s = report.sensitivity
        parts.append(f"<h2>Sensitivity</h2><p class='note'>PPL when only one {_e(s['mode'])} is quantized with "
                     f"<code>{_e(s['scheme'])}</code>, {s['windows']} × {s['seqlen']} tokens of {_e(s['source'])}; "
                     f"full precision {s['baseline_ppl']:.3f}.</p><table><tr><th class='l'>quantized alone</th>"
                     "<th>PPL</th><th>Δ</th></tr>" + "".join(
                         f"<tr><td class='l'>{_e(k)}</td><td>{r['ppl']:.3f}</td><td>{r['delta_pct']:+.2f}%</td></tr>"
                         for k, r in sorted(s["results"].items(), key=lambda kv: -kv[1]["delta_pct"])[:20])
                     + "</table>")
    parts.append(f"<details><summary>All {len(layers)} layers</summary>"
                 + _layer_table(layers, thr, detail=False, sens=sens) + "</details>")
    t = report.timing
    parts.append(f"<p class='meta'>Scan time {t.get('scan_seconds', 0):.1f}s · peak RSS {t.get('peak_rss_mb', 0):.0f} "
                 f"MiB · {t.get('calibration_tokens', 0)} calibration tokens.</p></body></html>")
    return "\n".join(parts)


def write_html(report: ScanReport, path: str) -> Path:
    """Write atomically (temporary file, then rename)."""
    return atomic_write_text(path, render_html(report))
