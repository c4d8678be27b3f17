"""The search metric of ``qdoctor fix``: parsing, budget semantics, the task-accuracy metric
against an independent ``evaluate()`` call, and a search scored by task accuracy."""

import copy
import json
import random

import pytest
import torch

from helpers import tiny_model, tiny_tokenizer
from qdoctor.calib.collect import CalibrationConfig
from qdoctor.errors import QDoctorError
from qdoctor.eval.zeroshot import DEFAULT_TASKS, evaluate
from qdoctor.export.card import search_lines
from qdoctor.policy.metric import PerplexityMetric, TaskAccuracyMetric, parse_metric
from qdoctor.policy.search import RESULT_KEYS, FixConfig, Plan, Searcher, Trial, search
from qdoctor.quant import QuantLinear, get_scheme, quantize, restore

CAL = CalibrationConfig(n_samples=4, seqlen=64, sample_rows=32, holdout_fraction=0.2)
WORDS = "the a river sea town old new water stone road hill bird tree cat dog red blue green".split()


def _sent(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def write_tasks(folder, seed=0):
    """Small piqa / arc_easy / lambada_openai files in the shipped schemas (docs/zeroshot.md)."""
    rng = random.Random(seed)
    _write(folder / "piqa.jsonl", [{"goal": _sent(rng, 6), "sol1": _sent(rng, 4), "sol2": _sent(rng, 5), "label": i % 2}
                                   for i in range(30)])
    _write(folder / "arc_easy.jsonl", [
        {"id": str(i), "question": _sent(rng, 7),
         "choices": {"text": [_sent(rng, 1), _sent(rng, 3), _sent(rng, 2), _sent(rng, 5)], "label": list("ABCD")},
         "answerKey": "ABCD"[(i * 3) % 4]} for i in range(25)])
    _write(folder / "lambada_openai.jsonl", [{"text": _sent(rng, 8)} for _ in range(10)])
    return folder


def test_parse_metric_and_config_errors():
    assert parse_metric("ppl").name == "ppl" and parse_metric(" PPL ").name == "ppl"
    spec = parse_metric("tasks:piqa, arc_easy")
    assert spec.name == "tasks" and spec.tasks == ("piqa", "arc_easy") and str(spec) == "tasks:piqa,arc_easy"
    assert parse_metric("tasks:all").tasks == tuple(DEFAULT_TASKS)
    for bad, why in [("accuracy", "bad metric"), ("tasks", "bad metric"), ("tasks:", "empty task name"),
                     ("tasks:piqa,,boolq", "empty task name"), ("tasks:piqa,piqa", "listed twice"),
                     ("tasks:nope", "unknown task 'nope'"), ("ppl:piqa", "bad metric")]:
        with pytest.raises(QDoctorError, match=why):
            parse_metric(bad)
    assert FixConfig().metric == "ppl"  # the default is unchanged
    with pytest.raises(QDoctorError, match="unknown task"):
        FixConfig(metric="tasks:piqa,nope")
    with pytest.raises(QDoctorError, match="--metric-items"):
        FixConfig(metric="tasks:piqa", metric_items=0)
    with pytest.raises(QDoctorError, match="points"):
        FixConfig(metric="tasks:piqa", budget_pct=-1.0)
    assert FixConfig(metric="tasks:piqa").budget_unit == "points" and FixConfig().budget_unit == "%"


def test_budget_semantics_points_vs_percent():
    m = TaskAccuracyMetric.__new__(TaskAccuracyMetric)  # the budget rules need no model
    m.fp_value = 0.5
    # the budget is a drop in percentage POINTS of accuracy, not a relative percent:
    assert m.within_budget(0.49, 0.5, 1.0)  # −1 point (rounding-safe); −2% relative would fail a 1% budget
    assert not m.within_budget(0.4899, 0.5, 1.0)
    assert m.within_budget(0.6, 0.5, 0.0) and m.within_budget(0.5, 0.5, 0.0) and not m.within_budget(0.4999, 0.5, 0.0)
    assert m.within_budget(0.975, 1.0, 2.5) and not m.within_budget(0.95, 1.0, 2.5)
    assert m.delta(0.49) == pytest.approx(-1.0) and m.delta(0.7, ref=0.6) == pytest.approx(10.0)
    assert m.better(0.51, 0.5) and not m.better(0.5, 0.5) and not m.better(0.4, 0.5)
    assert m.limit(0.5, 1.0) == pytest.approx(0.49)
    p = PerplexityMetric(None, torch.zeros(1, 4, dtype=torch.long), fp_value=10.0)
    assert p.within_budget(10.1, 10.0, 1.0) and not p.within_budget(10.11, 10.0, 1.0)  # relative percent
    assert p.better(9.0, 10.0) and not p.better(10.0, 10.0)
    assert p.delta(10.5) == pytest.approx(5.0)


def test_task_metric_equals_independent_evaluate(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    data = write_tasks(tmp_path)
    tasks = ["piqa", "arc_easy", "lambada_openai"]
    metric = TaskAccuracyMetric(model, tok, tasks, items=12, seed=7, data_dir=data)
    ref = evaluate(model, tok, tasks=tasks, subsample=12, seed=7, data_dir=data, progress=False)
    assert metric.fp_details == {t: ref[t].metrics["acc"] for t in tasks}
    assert metric.correct(model) == {t: [it.correct for it in ref[t].items] for t in tasks}  # item by item
    assert metric.fp_value == pytest.approx(sum(ref[t].metrics["acc"] for t in tasks) / 3, abs=1e-12)
    for d in metric.data:  # the seeded draw of evaluate(subsample=, seed=)
        assert d.indices == [it.index for it in ref[d.spec.name].items] and len(d.indices) == min(12, d.n_total)
    assert metric.data[2].n_total == 10 and len(metric.data[2].indices) == 10  # fewer items than asked: all
    info = metric.describe()
    assert info["name"] == "tasks" and info["score"] == "acc" and info["tasks"]["piqa"] == {
        "items": 12, "of": 30, "data_file": str(data / "piqa.jsonl")}

    # items are tokenized once: scoring a quantized model never encodes again
    def no_encoding(*a, **k):
        raise AssertionError("encoded again")

    metric.encoder.encode_pair = no_encoding
    quantize(model, get_scheme("w8a8-channel-token"), progress=False)
    try:
        value, per_task = metric.measure(model)
        ref_q = evaluate(model, tok, tasks=tasks, subsample=12, seed=7, data_dir=data, progress=False)
    finally:
        restore(model)
    assert per_task == {t: ref_q[t].metrics["acc"] for t in tasks}
    assert value == pytest.approx(sum(per_task.values()) / 3, abs=1e-12)


def _spiked_model_and_task(folder):
    """A tiny model with two huge norm channels (per-tensor static INT8 then flips answers) and a
    PIQA-format task of near-tie items whose gold labels are the full-precision predictions."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[5] = 300.0
    rng = random.Random(0)
    recs = []
    for _ in range(40):
        stem = _sent(rng, 4)
        recs.append({"goal": _sent(rng, 6), "sol1": f"{stem} {rng.choice(WORDS)}", "sol2": f"{stem} {rng.choice(WORDS)}",
                     "label": 0})
    _write(folder / "piqa.jsonl", recs)
    fp = evaluate(model, tok, tasks=["piqa"], data_dir=folder, progress=False)["piqa"]
    for r, it in zip(recs, fp.items):
        r["label"] = it.pred
    _write(folder / "piqa.jsonl", recs)
    return model, tok


def test_search_with_task_metric_honours_points_and_rescoring_matches(tmp_path):
    model, tok = _spiked_model_and_task(tmp_path)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    budget = 2.5  # points = exactly one of the 40 items
    cfg = FixConfig(target="w8a8-tensor-static", budget_pct=budget, eval_windows=1, eval_seqlen=64,
                    max_layer_fraction=0.15, spike_min_ratio=1.0, calibration=CAL, alphas=("auto",),
                    metric="tasks:piqa", metric_items=40, task_data=str(tmp_path))
    s = Searcher(model, tok, cfg, progress=False)
    r = search(model, tok, searcher=s, progress=False)
    assert r.fp_value == 1.0 and r.fp_details == {"piqa": 1.0}  # by construction
    assert r.naive.value < 1.0 - budget / 100  # naive INT8 loses more than the budget here
    for t in r.trials:
        assert t.metric == "tasks" and t.ppl is None and t.delta_pct is None
        assert t.delta == pytest.approx(100 * (t.value - r.fp_value)) and t.value == t.details["piqa"]
    assert r.met == (100 * (r.fp_value - r.best.value) <= budget + 1e-9)
    assert r.met and r.best.label != "naive" and r.best.kept + r.best.per_group <= 2
    # the model is left as it was
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    # the plan's recipe, applied again and scored independently (evaluate()), gives the recorded value
    r.recipe.apply(model, tok, stats=copy.deepcopy(s.stats), progress=False)
    try:
        again = evaluate(model, tok, tasks=["piqa"], subsample=40, seed=1234, data_dir=tmp_path, progress=False)
    finally:
        restore(model)
        model.load_state_dict(ref)
    assert again["piqa"].metrics["acc"] == r.best.value
    d = r.to_dict()
    assert d["metric"]["name"] == "tasks" and d["budget"] == budget and d["budget_unit"] == "points"
    assert d["planned_value"] == r.best.value and d["fp_value"] == 1.0 and "planned_ppl" not in d
    assert d["task_values"]["planned"] == {"piqa": r.best.value}
    assert r.recipe.metrics["metric"]["name"] == "tasks"
    assert set(d) <= set(RESULT_KEYS)  # what the model card draws as the search's table
    card = "\n".join(search_lines(r.recipe.metrics))
    assert f"| this plan: {r.best.label} | {100 * r.best.value:.2f} |" in card and "40 items per task of piqa" in card
    # evaluate(windows=...) still means perplexity, whatever the metric
    t = s.evaluate(Plan(), windows=s.windows)
    assert t.metric == "ppl" and t.value == t.ppl and t.delta_pct == pytest.approx(100 * (t.ppl / s.fp_ppl - 1))
    # an override returning a perplexity-only Trial cannot silently drive a task search
    s.evaluate = lambda plan, windows=None: Trial(plan.label, 10.0, 0.0, 0, 0, 0.0, plan)
    with pytest.raises(TypeError, match="Trial without a value for the .tasks. search metric"):
        search(model, tok, searcher=s, progress=False)


def test_trial_positional_construction_and_ppl_subclass():
    t = Trial("x", 12.0, 3.0, 1, 2, 0.5, None)
    assert (t.metric, t.value, t.delta, t.details) == ("ppl", 12.0, 3.0, {})

    class Wrapped(Searcher):  # as a block-streaming subclass would: build its own Trial
        def evaluate(self, plan, windows=None):
            t = super().evaluate(plan, windows)
            return Trial(t.label, t.ppl, t.delta_pct, t.kept, t.per_group, t.seconds, t.plan)

    model, tok = tiny_model("llama"), tiny_tokenizer()
    cfg = FixConfig(target="w8a8-channel-static", budget_pct=50.0, eval_windows=1, eval_seqlen=64, calibration=CAL)
    r = search(model, tok, searcher=Wrapped(model, tok, cfg, progress=False), progress=False)
    d = r.to_dict()
    assert r.met and d["planned_ppl"] == r.best.ppl == r.best.value and d["budget_pct"] == 50.0
    assert d["metric"]["name"] == "ppl" and d["budget_unit"] == "%" and d["fp_value"] == r.fp_ppl
    assert r.met == (r.best.ppl <= r.fp_ppl * 1.5)
