"""The doctor's ``report.html``: one self-contained page read top to bottom — verdict, diagnosis,
plan, verification, runtimes, files — rendered from a ``doctor.DoctorResult`` (nothing measured
here). Plots are PNGs embedded as base64; no scripts, fonts or external assets. Every section
is a ``<section id=…>`` and every plot an ``<img data-plot=…>``, which the browser test reads."""

from __future__ import annotations

import html

from qdoctor.report import plots
from qdoctor.report.html import CSS, img_tag
from qdoctor.report.markdown import num, pct

SECTIONS = ("verdict", "diagnosis", "plan", "verification", "runtimes", "files", "run")

_EXTRA_CSS = """
section{margin-bottom:10px}
.verdict{font-size:15px;padding:12px 18px;margin:16px 0;border-left:6px solid #3a3;background:#eef8ee}
.verdict.missed{border-left-color:#d62728;background:#fde2e2}
.verdict b.big{font-size:19px}
td.ok{color:#186a18;font-weight:600} td.no{color:#b00;font-weight:600}
table.steps td{text-align:left;max-width:520px}
pre.sample{background:#f7f7f7;padding:8px 12px;white-space:pre-wrap;max-width:1000px}
span.badge{color:#fff;padding:1px 7px;border-radius:9px;font-size:11.5px;white-space:nowrap}
td.l{max-width:560px}
.plots{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start} .plots img{margin:0}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _plot(png: bytes, name: str, alt: str) -> str:
    return img_tag(png, alt).replace("<img ", f'<img data-plot="{_e(name)}" ', 1)


def _table(head: list[str], rows: list[list[str]], cls: str = "", left: "int | set[int]" = 1) -> str:
    """Cells are HTML already; the first ``left`` columns (or those whose index is in ``left``) are
    left-aligned."""
    lefts = set(range(left)) if isinstance(left, int) else set(left)
    th = "".join(f'<th class="{"l" if i in lefts else ""}">{_e(h)}</th>' for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i in lefts else ""}">{c}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f'<table class="{cls}"><tr>{th}</tr>{body}</table>'


def _pct(v: float) -> str:
    return f"{v:+.2f}%"


def _pts(v: float, se: float | None = None) -> str:
    return f"{100 * v:.1f}" + (f" ± {100 * se:.1f}" if se is not None else "")


def worst_layers(scan, limit: int = 6) -> list:
    """The flagged layers a reader should see first: the weight outliers by per-channel INT8 weight
    error, then the activation spikes by spike ratio (``limit`` of each)."""
    weights = sorted(scan.flagged(), key=lambda f: -f.errors["out_w_channel"])
    spikes = sorted(scan.flagged(), key=lambda f: -f.spike_ratio)
    out = [f for f in weights if f.weight_outlier][:limit]
    return out + [f for f in spikes if f.activation_spike and f not in out][:limit]


def _treatment_of(result) -> dict[str, str]:
    """Layer → what the plan does to it (per-group g / kept dtype)."""
    plan = result.fix.best.plan
    out = {n: f"per-group g={plan.overrides[n].weights.granularity.group_size}" for n in plan.per_group()}
    out.update({n: f"kept {plan.overrides[n].keep or 'fp8'}" for n in plan.kept()})
    return out


def _verdict(r) -> str:
    v, fix = r.verification, r.fix
    served = [c.runtime for c in r.runtimes if c.serves]
    missed = "" if fix.met else " missed"
    cfg = fix.config
    lines = [f"<b class='big'>{_e(fix.config.target)}: naive {_pct(v['naive_delta_pct'])} perplexity → plan "
             f"{_pct(v['planned_delta_pct'])}</b> on WikiText-2 test ({v['windows']} × {v['seqlen']} tokens)",
             f"Plan <code>{_e(fix.best.label)}</code>: {fix.best.kept} layer(s) kept out of INT8, "
             f"{fix.best.per_group} per-group, of {fix.total_layers}; held-out budget +{cfg.budget_pct:g}% "
             + ("<b>met</b>" if fix.met else "<b>NOT met</b> (the best plan found is shown and exported)"),
             "Checkpoint served by: " + (", ".join(_e(s) for s in served) if served else "none of the checked runtimes")]
    return f"<div class='verdict{missed}'>" + "<br>".join(lines) + "</div>"


def _diagnosis(r) -> str:
    scan = r.scan
    layers, flagged = scan.layers, scan.flagged()
    c = scan.summary.counts
    out = ["<section id='diagnosis'><h2>1 · Diagnosis: why W8A8 breaks this model</h2>"]
    out.append("<div class='summary" + ("" if flagged else " clean") + "'><ul>"
               + "".join(f"<li>{_e(s)}</li>" for s in scan.summary.lines) + "</ul></div>")
    out.append("<div class='badges'>" + "".join(f"<span class='v-{v}'>{v}: {c.get(v, 0)}</span>"
                                                for v in ("ok", "weight-outlier", "activation-spike", "both"))
               + "</div>")
    out.append("<div class='plots'>")
    out.append(_plot(plots.heatmap(layers, lambda f: f.spike_ratio, "Activation spike ratio (max / median token "
                                   "absmax of the layer input); red: activation-spike layer",
                                   flagged=lambda f: f.activation_spike, cbar_label="spike ratio"),
                     "heatmap-spike", "spike ratio heatmap"))
    out.append(_plot(plots.heatmap(layers, lambda f: f.errors["out_w_channel"] * 100, "Per-channel INT8 weight-only "
                                   "output error (%); red: weight-outlier layer",
                                   flagged=lambda f: f.weight_outlier, cbar_label="error %"),
                     "heatmap-weight", "weight error heatmap"))
    out.append("</div>")
    worst = worst_layers(scan)
    if worst:
        treated = _treatment_of(r)
        rows = [[f"<code>{_e(f.name)}</code>", f"<span class='badge v-{_e(f.verdict)}'>{_e(f.verdict)}</span>",
                 f"{num(f.weight.max_abs)} ({num(f.weight.max_median_ratio)}× median dim)",
                 pct(f.errors["out_w_channel"]), num(f.spike_ratio), num(f.activation.max_token_max),
                 pct(f.errors["out_a_tensor_static_int8"], 1), _e("; ".join(f.reasons)),
                 _e(treated.get(f.name, "—"))] for f in worst]
        out.append(f"<h3>The worst layers ({len(worst)} of {len(flagged)} flagged) and their evidence</h3>")
        out.append(_table(["layer", "verdict", "max|W|", "W-only INT8 err (channel)", "spike ratio", "input max |x|",
                           "A static INT8 err", "evidence", "in the plan"], rows, left={0, 1, 7, 8}))
    thr = scan.config.get("thresholds", {})
    out.append(f"<p class='note'>weight-outlier: max/median input-dimension |W| &gt; {thr.get('weight_dim_ratio'):g} "
               f"and per-channel INT8 weight-only output error ‖XWᵀ − XQ(W)ᵀ‖/‖XWᵀ‖ &gt; "
               f"{pct(thr.get('weight_error'), 0)}; activation-spike: spike ratio &gt; {thr.get('spike_ratio'):g}. "
               f"Every layer, every scheme's error and the token/channel profiles: <a href='{_e(r.files['scan_html'])}'>"
               f"{_e(r.files['scan_html'])}</a>.</p></section>")
    return "\n".join(out)


def _plan(r) -> str:
    fix = r.fix
    out = ["<section id='plan'><h2>2 · Plan: the cheapest treatment that meets the budget</h2>"]
    rows = [[str(i + 1), _e(s.what), "<code>" + _e(", ".join(s.layers)) + "</code>", _e(s.why), _e(s.cost)]
            for i, s in enumerate(r.steps)]
    out.append(_table(["#", "step", "layers", "why", "cost at inference"], rows, cls="steps", left=5))
    ppl_metric = fix.metric_name == "ppl"
    trial_rows = [[_e(t.label) + (" ◀ chosen" if t is fix.best else ""),
                   f"{t.value:.3f}" if ppl_metric else _pts(t.value), _pct(t.delta) if ppl_metric else f"{t.delta:+.2f}",
                   str(t.kept), str(t.per_group), f"{t.seconds:.0f}"] for t in fix.trials]
    h = fix.config
    out.append(f"<h3>Search path ({len(fix.trials)} plans scored on held-out text: {h.eval_windows} × "
               f"{h.eval_seqlen} tokens of the last {h.calibration.holdout_fraction:.0%} of "
               f"{_e(h.calibration.source)}; FP {fix.fp_ppl:.3f}, budget +{h.budget_pct:g}%)</h3>")
    out.append(_table(["plan", "PPL", "Δ vs FP", "kept", "per-group", "s"], trial_rows))
    out.append(f"<p class='note'>Re-apply the plan anywhere: <code>qdoctor quantize --model {_e(r.model)} --recipe "
               f"{_e(r.files['recipe'])}</code> (<a href='{_e(r.files['recipe'])}'>{_e(r.files['recipe'])}</a>).</p>"
               "</section>")
    return "\n".join(out)


def _verification(r) -> str:
    v, fix = r.verification, r.fix
    out = ["<section id='verification'><h2>3 · Verification on text the search never saw</h2>"]
    rows = [["full precision", f"{v['fp_ppl']:.3f}", "—"],
            [f"naive {_e(fix.config.target)}", f"{v['naive_ppl']:.3f}", _pct(v["naive_delta_pct"])],
            [f"plan: {_e(fix.best.label)}", f"{v['planned_ppl']:.3f}", _pct(v["planned_delta_pct"])]]
    out.append(f"<h3>Perplexity, WikiText-2 test ({v['windows']} × {v['seqlen']} tokens)</h3>")
    out.append("<div class='plots'>" + _table(["", "PPL", "Δ vs FP"], rows))
    budget = v["fp_ppl"] * (1 + fix.config.budget_pct / 100)
    out.append(_plot(plots.value_bars(["full precision", "naive", "plan"],
                                      [v["fp_ppl"], v["naive_ppl"], v["planned_ppl"]],
                                      "WikiText-2 test perplexity", "perplexity",
                                      reference=(budget, f"FP + {fix.config.budget_pct:g}% (the budget)"),
                                      colors=["#7f7f7f", "#d62728", "#2ca02c"]), "ppl-bars", "perplexity bars"))
    out.append("</div>")
    if r.tasks:
        t0 = r.tasks[0]
        cfg = r.config
        rows = [[_e(t.task), f"{t.items}/{t.of}", _pts(t.fp_acc, t.fp_stderr), _pts(t.plan_acc, t.plan_stderr),
                 f"{100 * t.delta:+.1f} ± {100 * t.delta_stderr:.1f}"] for t in r.tasks]
        out.append(f"<h3>Zero-shot accuracy ({len(r.tasks)} task(s), {t0.items} items each drawn with seed "
                   f"{cfg.task_seed}; lm-eval prompts and scoring)</h3>")
        out.append("<div class='plots'>" + _table(["task", "items", "FP acc %", "plan acc %", "Δ points (paired)"], rows))
        out.append(_plot(plots.grouped_errorbars(
            [t.task for t in r.tasks],
            [("full precision", [100 * t.fp_acc for t in r.tasks], [100 * t.fp_stderr for t in r.tasks]),
             ("plan", [100 * t.plan_acc for t in r.tasks], [100 * t.plan_stderr for t in r.tasks])],
            "Zero-shot accuracy (± 1 standard error)", "acc %"), "task-bars", "zero-shot accuracy"))
        out.append("</div><p class='note'>± is one standard error; the Δ's is paired (the same items, "
                   "per-item differences), so it is smaller than the two accuracies' errors combined.</p>")
    out.append("</section>")
    return "\n".join(out)


def _runtimes(r) -> str:
    e = r.export
    mb = 1024 * 1024
    out = ["<section id='runtimes'><h2>4 · Which runtimes serve the checkpoint</h2>"]
    rows = []
    for c in r.runtimes:
        mark = "<td class='ok'>yes</td>" if c.serves else "<td class='no'>no</td>" if c.serves is False else "<td>—</td>"
        rows.append(f"<tr><td class='l'>{_e(c.runtime)}</td>{mark}<td class='l'>{_e(c.how)}</td>"
                    f"<td class='l'>{_e(c.detail)}</td></tr>")
    out.append("<table><tr><th class='l'>runtime</th><th>serves it</th><th class='l'>checked by</th>"
               "<th class='l'>detail</th></tr>" + "".join(rows) + "</table>")
    for c in r.runtimes:
        if c.sample:
            out.append(f"<p class='note'>{_e(c.runtime)} generated (greedy):</p><pre class='sample'>{_e(c.sample)}</pre>")
    groups = [[_e(g["name"]), _e(g["scheme"]), str(g["n_layers"]), _e(g["format"]), _e(g["vllm"])] for g in e.groups]
    out.append(f"<p class='note'>compressed-tensors format <code>{_e(e.format)}</code>, unquantized tensors in "
               f"{_e(e.checkpoint_dtype)}; {e.total_bytes / mb:.1f} MiB (weights {e.weights_bytes / mb:.1f} MiB vs "
               f"{e.bf16_bytes / mb:.1f} MiB in bf16). Serve: <code>vllm serve {_e(r.files['checkpoint'])}</code>; "
               f"load: <code>AutoModelForCausalLM.from_pretrained(\"{_e(r.files['checkpoint'])}\")</code>.</p>")
    out.append(_table(["config group", "scheme", "layers", "format", "vLLM"], groups))
    if e.unquantized:
        kept = {k: v for k, v in e.unquantized.items() if v != "ignored by the scheme"}
        if kept:
            out.append("<p class='note'>Stored in floating point: " + ", ".join(
                f"<code>{_e(k)}</code> ({_e(v)})" for k, v in kept.items()) + "</p>")
    out += [f"<p class='note'>warning: {_e(w)}</p>" for w in e.warnings]
    out.append("</section>")
    return "\n".join(out)


def _files(r) -> str:
    what = {"report": "this page", "result": "everything on this page as JSON (schema qdoctor.doctor/1)",
            "scan_json": "the full diagnosis (schema qdoctor.scan/1)", "scan_html": "the full diagnosis, with plots",
            "recipe": "the plan (re-apply with qdoctor quantize / export --recipe)",
            "checkpoint": "the compressed-tensors checkpoint (config.json, safetensors, tokenizer, model card)"}
    rows = [[f"<a href='{_e(path)}'>{_e(path)}</a>", _e(what.get(k, ""))] for k, path in r.files.items()]
    return "<section id='files'><h2>5 · Files</h2>" + _table(["file", "holds"], rows, left=2) + "</section>"


def _run(r) -> str:
    cfg, cal = r.config, r.config.fix.calibration
    phases = " · ".join(f"{_e(k)} {v:.0f}s" for k, v in r.phases.items())
    return ("<section id='run'><h2>6 · How this was measured</h2><p class='meta'>"
            f"calibration {cal.n_samples} × {cal.seqlen} tokens of {_e(cal.source)} (seed {cal.seed}), the last "
            f"{cal.holdout_fraction:.0%} held out for the search · {cfg.fix.eval_windows} × {cfg.fix.eval_seqlen} "
            f"held-out tokens per plan · test {cfg.test_windows} × {cfg.test_seqlen} tokens · zero-shot "
            f"{', '.join(cfg.tasks) or 'off'} ({cfg.task_items} items, seed {cfg.task_seed}) · serve profile "
            f"{_e(cfg.fix.profile.describe())}</p><p class='meta'>wall time: {phases} · peak RSS {r.peak_rss_mb:.0f} MiB"
            "</p></section>")


def render_doctor_html(r) -> str:
    """The whole page of a ``DoctorResult`` as one string."""
    m = r.scan.model
    title = f"qdoctor doctor · {r.model or m.get('source') or m.get('class')}"
    head = (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{CSS}{_EXTRA_CSS}"
            f"</style></head><body><h1>{_e(title)}</h1><div class='meta'>{_e(m.get('class'))} · {m.get('blocks')} "
            f"blocks · {m.get('linear_layers')} linear layers · target {_e(r.fix.config.target)} · budget "
            f"+{r.fix.config.budget_pct:g}% held-out perplexity</div>")
    body = [f"<section id='verdict'>{_verdict(r)}</section>", _diagnosis(r), _plan(r), _verification(r),
            _runtimes(r), _files(r), _run(r)]
    return head + "\n".join(body) + "</body></html>"
