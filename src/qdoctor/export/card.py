"""The model card (README.md) of an exported checkpoint.

It states what the checkpoint holds — the scheme of every layer, grouped as in the config,
and the layers left in floating point with the reason — and prints the caller's evidence
and measurements exactly as given (a plan search's result, which a recipe from ``qdoctor fix``
records among its metrics, as one table of the numbers it measured). It never computes or
invents a number of its own beyond sizes of the files written and a relative change between
two numbers the caller supplied.

``card`` (all keys optional)::

    {"title": "SmolLM2-135M W8A8 (spikes kept in bf16)",
     "evidence": {"model.layers.11.mlp.down_proj": "activation spike ratio 2040 (scan)"},   # layer or glob → text
     "ppl": {"full_precision": 30.36, "quantized": 31.02, "windows": 8, "seqlen": 512, "text": "wikitext2:test"},
     "metrics": {"calibration": "64 × 512 tokens of WikiText-2 valid", ...},                  # label → value
     "notes": ["free text", ...]}
"""

from __future__ import annotations

import fnmatch
import numbers
import re
from collections import OrderedDict

from qdoctor.policy.search import RESULT_KEYS
from qdoctor.quant.granularity import granularity_to_str
from qdoctor.text import index_ranges

_INDEXED = re.compile(r"^(?P<prefix>.*?\.)(?P<idx>\d+)(?P<suffix>\..+)$")
_PPL_META = ("windows", "seqlen", "text", "n_windows", "source")


def render_card(plan, report, card: dict | None = None, source: str = "") -> str:
    card = dict(card or {})
    evidence = dict(card.get("evidence") or {})
    title = card.get("title") or f"{source or 'model'} — quantized with qdoctor (compressed-tensors)"
    mb = 1024 * 1024
    out = ["---", "library_name: transformers", "tags: [compressed-tensors, quantized, qdoctor, "
           + ", ".join(sorted({_tag(g) for g in plan.groups})) + "]", "---", "", f"# {title}", ""]
    out += [f"Exported by qdoctor from `{source or 'an in-memory model'}` in compressed-tensors format "
            f"(`{plan.config.format}`); unquantized tensors are stored in {report.checkpoint_dtype}.", "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer  # needs `pip install compressed-tensors`",
            'model = AutoModelForCausalLM.from_pretrained("<this directory>")',
            'tokenizer = AutoTokenizer.from_pretrained("<this directory>")',
            "```", ""]
    if report.vllm_issues:
        out += ["**vLLM:** this plan uses schemes vLLM has no kernel for, so `vllm serve` will refuse it:", ""]
        out += [f"- {w}" for w in report.vllm_issues] + [""]
    else:
        out += ["**vLLM:** every scheme in this checkpoint has a vLLM kernel (`vllm serve <this directory>`; "
                "checked against vLLM's compressed-tensors rules, not run).", ""]
    out += serving_lines(plan, report)
    out += [f"Weights: {report.weights_bytes / mb:.1f} MiB of safetensors, vs {report.fp32_bytes / mb:.1f} MiB "
            f"unquantized in fp32 and {report.bf16_bytes / mb:.1f} MiB in bf16.", ""]

    out += ["## Scheme per layer", "",
            "| group | weights | activations | format | layers | which |", "|---|---|---|---|---|---|"]
    for g in plan.groups:
        out.append(f"| {g.name} | {_spec(g.scheme.weights, True)} | {_spec(g.scheme.activations, False)} | "
                   f"{g.format} | {len(g.layers)} | {'<br>'.join(f'`{x}`' for x in compact_names(g.layers))} |")
    out.append("")

    out += ["## Layers kept in floating point", ""]
    if plan.unquantized:
        out += ["| layer | stored as | why |", "|---|---|---|"]
        for name, why in plan.unquantized.items():
            stored = plan.kept.get(name, report.checkpoint_dtype)
            given = _evidence_for(name, evidence)
            out.append(f"| `{name}` | {stored} | {why}{' — ' + given if given else ''} |")
        out.append("")
    else:
        out += ["None.", ""]

    out += ["## Measured", ""]
    measured = False
    ppl = card.get("ppl") or {}
    if ppl:
        measured = True
        meta = ", ".join(f"{k} {ppl[k]}" for k in _PPL_META if k in ppl)
        out += [f"Perplexity ({meta}):" if meta else "Perplexity:", "", "| model | PPL | Δ vs full precision |",
                "|---|---|---|"]
        base = ppl.get("full_precision")
        for k, v in ppl.items():
            if k in _PPL_META or not isinstance(v, numbers.Real):
                continue
            has_base = isinstance(base, numbers.Real) and base and k != "full_precision"
            delta = f"{100.0 * (v / base - 1.0):+.2f}%" if has_base else "—"
            out.append(f"| {k} | {v:.4f} | {delta} |")
        out.append("")
    v = report.verification
    if v and "skipped" not in v:
        measured = True
        out += [f"Verified at export on {v['windows']} × {v['seqlen']} tokens of {v['text']}:", "",
                "| | PPL |", "|---|---|",
                f"| this directory, reloaded with transformers | {v['reloaded_ppl']:.4f} |",
                f"| qdoctor's simulation under the loader's rounding rule | {v['loader_rule_ppl']:.4f} "
                f"({v['gap_pct']:+.3f}%, limit ±{v['tolerance_pct']}%) |",
                f"| qdoctor's simulation, its own rounding (= vLLM's kernels) | {v['simulated_ppl']:.4f} |", ""]
    elif v:
        out += [f"Not verified at export: {v['skipped']}.", ""]
    metrics = card.get("metrics") or {}
    searched = search_lines(metrics)
    rest = {k: v for k, v in metrics.items() if not (searched and k in RESULT_KEYS)}
    if metrics:
        measured = True
        out += searched
    if rest:
        out += ["| measurement | value |", "|---|---|"] + [f"| {k} | {_cell(v)} |" for k, v in rest.items()] + [""]
    if evidence:
        measured = True
        out += ["Evidence supplied with this export:", ""]
        out += [f"- `{k}`: {_cell(v)}" for k, v in evidence.items()] + [""]
    if not measured:
        out += ["No measurements were supplied with this export.", ""]

    out += ["## Notes", "",
            "- Weights: symmetric INT8 (codes in [−127, 127]) or FP8 E4M3, scales in fp32 (`weight_scale`); "
            "static activation scales are stored as `input_scale`. qdoctor verified that decompressing every "
            "layer gives back its simulated weights bit for bit.",
            "- transformers runs this checkpoint by dequantizing the weights and fake-quantizing the inputs of each "
            "layer with compressed-tensors' rules, which differ slightly from qdoctor's and vLLM's for dynamic INT8 "
            "activations (scale absmax/127.5 with codes in [−128, 127], instead of absmax/127)."]
    out += [f"- {w}" for w in report.warnings if not w.startswith("vLLM fuses")]
    out += [f"- {n}" for n in card.get("notes") or []]
    out.append("")
    return "\n".join(out)


def search_lines(m: dict) -> list[str]:
    """The plan search's result among the card's metrics, as a table of the numbers it measured
    (full precision, naive, this plan on its metric) and a line of what the plan spends; [] when
    ``m`` holds no search result."""
    if not {"plan", "metric", "fp_value", "naive_value", "planned_value", "naive_delta", "planned_delta"} <= set(m):
        return []
    metric = m["metric"] or {}
    if metric.get("name") == "ppl":
        where = (f"{metric.get('windows')} × {metric.get('seqlen')} tokens of the {metric.get('source')} "
                 "(held out from calibration)")
        col, value, delta = "PPL", (lambda v: f"{v:.3f}"), (lambda d: f"{d:+.2f}%")
    else:
        tasks = ", ".join(metric.get("tasks") or {})
        where = f"{metric.get('items_per_task')} items per task of {tasks} (seed {metric.get('seed')})"
        col, value, delta = "mean accuracy", (lambda v: f"{100.0 * v:.2f}"), (lambda d: f"{d:+.2f} pts")
    unit = "%" if m.get("budget_unit", "%") == "%" else f" {m['budget_unit']}"
    verdict = "met" if m.get("met") else "missed"
    out = [f"The plan search scored each candidate plan on {where}:", "",
           f"| plan | {col} | vs full precision |", "|---|---|---|",
           f"| full precision | {value(m['fp_value'])} | — |",
           f"| naive {m.get('target', '')} | {value(m['naive_value'])} | {delta(m['naive_delta'])} |",
           f"| this plan: {_cell(m['plan'])} | {value(m['planned_value'])} | {delta(m['planned_delta'])} "
           f"(budget {m.get('budget')}{unit}: {verdict}) |", ""]
    facts = []
    if "layers_total" in m:
        facts.append(f"{m.get('layers_kept', 0)} of {m['layers_total']} layers kept in floating point, "
                     f"{m.get('layers_per_group', 0)} per-group")
    cost = m.get("cost") or {}
    if cost.get("speedup_vs_bf16"):
        facts.append(f"estimated GEMM speed {cost['speedup_vs_bf16']:.2f}× BF16 at M = {cost.get('M')}")
    serve = m.get("serve") or {}
    if serve.get("runtime") == "any":
        facts.append("searched without a serving profile (--serve any)")
    elif serve.get("runtime"):
        where = f" ({serve.get('gpu')}, tp {serve.get('tp')})" if serve["runtime"] == "vllm" else ""
        facts.append(f"searched for the {serve['runtime']} serving profile{where}")
    if m.get("skipped"):
        facts.append(f"{len(m['skipped'])} candidate plan(s) skipped as unservable")
    return out + ([f"{'; '.join(facts)}.", ""] if facts else [])


def serving_lines(plan, report) -> list[str]:
    """Which runtimes and GPUs serve the checkpoint, and the vLLM kernel each layer group needs
    (``ExportReport.serving``, from ``serve.profiles``; checked against vLLM's rules, not run)."""
    serving = report.serving or {}
    per_gpu = serving.get("vllm") or {}
    if not per_gpu:
        return []
    opts = serving.get("options") or {}
    ok = [gpu for gpu, bad in per_gpu.items() if not bad]
    out = ["## Serving", "",
           "- transformers (with compressed-tensors): loads and runs every group (dequantized weights, "
           "fake-quantized inputs).",
           f"- vLLM (tensor parallelism {opts.get('tp', 1)}"
           + (", optional Humming kernel" if opts.get("allow_optional_kernels") else "") + "): "
           + (f"serves it on {', '.join(ok)}." if ok else "cannot serve it as planned on any GPU generation.")]
    for gpu, bad in per_gpu.items():
        if bad:
            out += [f"  - not on {gpu}: {line}" for line in bad]
    out += ["", "| group | vLLM kernel |", "|---|---|"]
    out += [f"| {g.name} | {_cell(serving.get('kernels', {}).get(g.name, '—'))} |" for g in plan.groups]
    out.append("")
    return out


def compact_names(names: list[str]) -> list[str]:
    """Readable layer lists: ``model.layers.[0-9,12].self_attn.{q_proj,k_proj}``."""
    by_suffix: "OrderedDict[tuple[str, str], list[int]]" = OrderedDict()
    plain: list[str] = []
    for n in names:
        m = _INDEXED.match(n)
        if m:
            by_suffix.setdefault((m["prefix"], m["suffix"]), []).append(int(m["idx"]))
        else:
            plain.append(n)
    by_idx: "OrderedDict[tuple[str, str, str], list[str]]" = OrderedDict()
    for (prefix, suffix), idx in by_suffix.items():
        parent, _, leaf = suffix.rpartition(".")
        by_idx.setdefault((prefix, index_ranges(idx), parent), []).append(leaf)
    out = []
    for (prefix, idx, parent), leaves in by_idx.items():
        tail = parent + "." + (leaves[0] if len(leaves) == 1 else "{" + ",".join(leaves) + "}")
        out.append(f"{prefix}[{idx}]{tail}" if "," in idx or "-" in idx else f"{prefix}{idx}{tail}")
    return out + plain


def _spec(spec, weights: bool) -> str:
    if spec is None:
        return "— (not quantized)"
    g = granularity_to_str(spec.granularity).replace("group:", "group ")
    text = f"{spec.dtype} per-{g}" if not g.startswith("group") else f"{spec.dtype} {g}"
    if not weights:
        text += " dynamic" if spec.dynamic else f" static ({spec.observer})"
    elif spec.observer != "absmax":
        text += f" ({spec.observer} clip search)"
    return text


def _tag(group) -> str:
    w, a = group.scheme.weights, group.scheme.activations
    return f"{'w8a8' if a else 'w8a16'}-{w.dtype}"


def _evidence_for(name: str, evidence: dict) -> str:
    for pattern, text in evidence.items():
        if pattern == name or fnmatch.fnmatchcase(name, pattern):
            return _cell(text)
    return ""


def _cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")
