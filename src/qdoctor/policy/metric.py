"""What ``qdoctor fix`` optimizes: the metric a candidate plan is scored by, and its budget.

Two metrics, chosen with ``FixConfig.metric`` (``qdoctor fix --metric``):

- ``ppl`` (default): perplexity on held-out text (the last ``holdout_fraction`` of the
  calibration source). Lower is better; the budget is the allowed *relative increase* over
  full precision in percent: a plan meets it when ``ppl ≤ fp_ppl · (1 + budget / 100)``.
- ``tasks:T1,T2,…`` (or ``tasks:all``): zero-shot accuracy (``qdoctor.eval.zeroshot``) on a
  fixed, seeded subsample of ``items`` items per task, drawn once. The value is the unweighted
  mean over the tasks of each task's ``acc`` — lm-eval's primary metric, defined for every
  task (argmax of the unnormalized continuation log-likelihood; LAMBADA: the last word is the
  greedy continuation). ``acc_norm`` is not used, so the numbers match ``qdoctor eval --tasks``'
  ``acc`` rows. Higher is better; the budget is the allowed *drop in percentage points* of the
  mean accuracy: a plan meets it when ``100 · (fp_acc − acc) ≤ budget``.

A metric object holds what it needs to score any state of the model (the held-out windows, or
the items already tokenized) and its full-precision value ``fp_value``:

    value, details = metric.measure(model)       # details: per-task accuracy ({} for ppl)
    metric.within_budget(value, metric.fp_value, budget)
    metric.better(a, b)                          # a strictly better than b
    metric.delta(value)                          # % (ppl) or points (tasks) vs fp_value
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qdoctor.distributed import current_world
from qdoctor.errors import QDoctorError

# Accuracies are multiples of 1/N: an exact drop of `budget` points must not miss by rounding.
_POINTS_TOL = 1e-9


@dataclass(frozen=True)
class MetricSpec:
    """A parsed ``--metric``: ``ppl``, or ``tasks`` with the task names in the given order."""

    name: str  # "ppl" | "tasks"
    tasks: tuple[str, ...] = ()

    def __str__(self) -> str:
        return "ppl" if self.name == "ppl" else "tasks:" + ",".join(self.tasks)


METRIC_SYNTAX = "use ppl or tasks:TASK[,TASK…] (e.g. tasks:piqa,arc_easy, or tasks:all)"


def parse_metric(text: str) -> MetricSpec:
    """``"ppl"`` → perplexity; ``"tasks:piqa,arc_easy"`` / ``"tasks:all"`` → zero-shot accuracy.

    Task names are checked against the registered tasks; every problem is a ``QDoctorError``."""
    from qdoctor.eval.zeroshot.tasks import DEFAULT_TASKS, get_task

    if not isinstance(text, str):
        raise QDoctorError(f"bad metric {text!r}: {METRIC_SYNTAX}")
    t = text.strip()
    if t.lower() == "ppl":
        return MetricSpec("ppl")
    head, sep, rest = t.partition(":")
    if head.strip().lower() != "tasks" or not sep:
        raise QDoctorError(f"bad metric {text!r}: {METRIC_SYNTAX}")
    names = [n.strip() for n in rest.split(",")]
    if rest.strip() == "all":
        names = list(DEFAULT_TASKS)
    if not rest.strip() or any(not n for n in names):
        raise QDoctorError(f"bad metric {text!r}: empty task name; {METRIC_SYNTAX}")
    if len(set(names)) != len(names):
        raise QDoctorError(f"bad metric {text!r}: a task is listed twice")
    for n in names:
        try:
            get_task(n)
        except QDoctorError as e:  # "unknown task 'x'; available: …"
            raise QDoctorError(f"bad metric {text!r}: {e}") from None
    return MetricSpec("tasks", tuple(names))


class Metric:
    """Interface (see the module docstring). ``fp_value`` is set by the constructor."""

    name = "metric"
    label = "value"  # column header
    unit = ""  # of the budget and of ``delta``
    higher_is_better = False
    fp_value: float

    def measure(self, model) -> tuple[float, dict]:
        raise NotImplementedError

    def score(self, model) -> float:
        return self.measure(model)[0]

    def measure_plan(self, model, recipe, stats) -> tuple[float, dict]:
        """``measure`` of ``model`` treated by ``recipe`` (a ``policy.recipe.Recipe``); the model
        is unchanged afterwards. Default: the whole model treated in place while measured."""
        with recipe.applied(model, self.tok, stats):
            return self.measure(model)

    def limit(self, fp_value: float, budget: float) -> float:
        """The worst value that still meets ``budget``."""
        raise NotImplementedError

    def within_budget(self, value: float, fp_value: float, budget: float) -> bool:
        raise NotImplementedError

    def better(self, a: float, b: float) -> bool:
        """``a`` strictly better than ``b``."""
        return a > b if self.higher_is_better else a < b

    def delta(self, value: float, ref: float | None = None) -> float:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError

    def format_value(self, value: float) -> str:
        raise NotImplementedError

    def format_delta(self, delta: float) -> str:
        raise NotImplementedError

    @property
    def budget_text(self) -> str:
        raise NotImplementedError


class PerplexityMetric(Metric):
    """Perplexity on fixed token windows; the budget is the allowed increase in percent."""

    name, label, unit, higher_is_better = "ppl", "PPL", "%", False
    budget_text = "allowed perplexity increase over full precision, in percent"

    def __init__(self, tokenizer, windows: torch.Tensor, model=None, fp_value: float | None = None,
                 source: str = "held-out text"):
        self.tok, self.windows, self.source = tokenizer, windows, source
        if fp_value is None:
            if model is None:
                raise ValueError("PerplexityMetric needs the model or fp_value")
            fp_value = self.score(model)
        self.fp_value = float(fp_value)

    def measure(self, model) -> tuple[float, dict]:
        from qdoctor.eval.perplexity import perplexity

        return perplexity(model, self.tok, windows=self.windows, progress=False).ppl, {}

    def measure_plan(self, model, recipe, stats) -> tuple[float, dict]:
        """Each block treated as it is opened (``Recipe.perplexity``): any residency."""
        return recipe.perplexity(model, self.tok, self.windows, stats)[0].ppl, {}

    def limit(self, fp_value: float, budget: float) -> float:
        return fp_value * (1.0 + budget / 100.0)

    def within_budget(self, value: float, fp_value: float, budget: float) -> bool:
        return value <= self.limit(fp_value, budget)

    def delta(self, value: float, ref: float | None = None) -> float:
        return 100.0 * (value / (self.fp_value if ref is None else ref) - 1.0)

    def describe(self) -> dict:
        return {"name": "ppl", "better": "lower", "budget": self.budget_text, "source": self.source,
                "windows": int(self.windows.shape[0]), "seqlen": int(self.windows.shape[1])}

    def format_value(self, value: float) -> str:
        return f"{value:.3f}"

    def format_delta(self, delta: float) -> str:
        return f"{delta:+.2f}%"


@dataclass
class _TaskItems:
    spec: object  # TaskSpec
    data_file: str
    n_total: int
    indices: list[int]  # record indices of the chosen items (file order)
    labels: list  # gold choice per item (None for LAMBADA)
    pairs: list  # per item: [(context_tokens, continuation_tokens)] per request


class TaskAccuracyMetric(Metric):
    """Mean zero-shot ``acc`` over tasks, each on a fixed seeded subsample of ``items`` items.

    The items are loaded, subsampled (``choose_indices(total, subsample=items, seed=seed)``, the
    draw of ``evaluate(..., subsample=items, seed=seed)``) and tokenized once, exactly as
    ``qdoctor.eval.zeroshot.evaluate`` does; ``measure`` only runs the model. The value is a
    fraction in [0, 1]; ``delta`` and the budget are in percentage points."""

    name, label, unit, higher_is_better = "tasks", "mean acc", "points", True
    budget_text = "allowed drop of the mean task accuracy (acc) below full precision, in percentage points"

    def __init__(self, model, tokenizer, tasks, items: int = 200, seed: int = 1234,
                 data_dir: "str | Path | None" = None, batch_size: int = 16, fp_value: float | None = None):
        from qdoctor.eval.zeroshot import PairEncoder, choose_indices, get_task, load_items
        from qdoctor.eval.zeroshot.encoding import bos_policy, resolve_max_length

        tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
        if not tasks:
            raise QDoctorError("the task metric needs at least one task")
        if len(set(tasks)) != len(tasks):
            raise QDoctorError(f"a task is listed twice: {list(tasks)}")
        if not isinstance(items, int) or isinstance(items, bool) or items < 1:
            raise QDoctorError(f"--metric-items must be a positive integer, got {items!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise QDoctorError(f"the metric batch size must be a positive integer, got {batch_size!r}")
        self.tasks, self.items, self.seed, self.batch_size = tasks, items, seed, batch_size
        self.data_dir = None if data_dir is None else str(data_dir)
        self.tok = tokenizer
        self.encoder = PairEncoder(tokenizer, force_bos=bos_policy(model, tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.max_length = resolve_max_length(model, tokenizer)
        t0 = time.perf_counter()
        self.data: list[_TaskItems] = []
        for name in tasks:
            spec = get_task(name)
            file, all_items = load_items(spec, self.data_dir)
            idx = choose_indices(len(all_items), subsample=items, seed=seed)
            chosen = [all_items[i] for i in idx]
            pairs = [[self.encoder.encode_pair(c, x) for c, x in zip(it.contexts, it.continuations)]
                     for it in chosen]
            self.data.append(_TaskItems(spec, str(file), len(all_items), [it.index for it in chosen],
                                        [it.label for it in chosen], pairs))
        self.encode_seconds = time.perf_counter() - t0
        self.fp_details: dict[str, float] = {}
        if fp_value is None:
            fp_value, self.fp_details = self.measure(model)
        self.fp_value = float(fp_value)

    def correct(self, model) -> dict[str, list[bool]]:
        """Per task, whether each chosen item is answered correctly (lm-eval's ``acc``); over
        several ranks (``qdoctor.distributed``) each scores a shard and the results are gathered."""
        from qdoctor.eval.zeroshot import LoglikelihoodScorer
        from qdoctor.eval.zeroshot.metrics import argmax

        scorer = LoglikelihoodScorer(model, batch_size=self.batch_size, max_length=self.max_length,
                                     share_prefix=True, pad_id=self.pad_id, progress=False)
        was_training = model.training
        model.eval()
        out: dict[str, list[bool]] = {}
        try:
            world = current_world()  # several ranks: each scores a shard, all get every item's result
            for d in self.data:
                scored = world.concat(scorer.score(d.pairs[world.shard(len(d.pairs))], desc=d.spec.name))
                if d.spec.kind == "loglikelihood":  # LAMBADA: the target is the greedy continuation
                    out[d.spec.name] = [bool(res[0][1]) for res in scored]
                else:
                    out[d.spec.name] = [argmax([ll for ll, _ in res]) == label
                                        for res, label in zip(scored, d.labels)]
        finally:
            model.train(was_training)
        return out

    def measure(self, model) -> tuple[float, dict]:
        per_task = {name: sum(c) / len(c) for name, c in self.correct(model).items()}
        return sum(per_task.values()) / len(per_task), per_task

    def limit(self, fp_value: float, budget: float) -> float:
        return fp_value - budget / 100.0

    def within_budget(self, value: float, fp_value: float, budget: float) -> bool:
        return 100.0 * (fp_value - value) <= budget + _POINTS_TOL

    def delta(self, value: float, ref: float | None = None) -> float:
        """Change in percentage points (negative: the plan lost accuracy)."""
        return 100.0 * (value - (self.fp_value if ref is None else ref))

    def describe(self) -> dict:
        return {"name": "tasks", "score": "acc", "aggregate": "unweighted mean over tasks", "better": "higher",
                "budget": self.budget_text, "items_per_task": self.items, "seed": self.seed,
                "data_dir": self.data_dir,
                "tasks": {d.spec.name: {"items": len(d.indices), "of": d.n_total, "data_file": d.data_file}
                          for d in self.data}}

    def format_value(self, value: float) -> str:
        return f"{100.0 * value:.2f}"

    def format_delta(self, delta: float) -> str:
        return f"{delta:+.2f} pts"


def build_metric(spec: "MetricSpec | str", model, tokenizer, windows: torch.Tensor | None = None,
                 fp_ppl: float | None = None, items: int = 200, seed: int = 1234,
                 data_dir: "str | Path | None" = None, batch_size: int = 16,
                 source: str = "held-out text") -> Metric:
    """The metric of ``spec`` for ``model`` (in full precision now: its value becomes ``fp_value``)."""
    spec = parse_metric(spec) if isinstance(spec, str) else spec
    if spec.name == "ppl":
        if windows is None:
            raise ValueError("the perplexity metric needs token windows")
        return PerplexityMetric(tokenizer, windows, model=model, fp_value=fp_ppl, source=source)
    return TaskAccuracyMetric(model, tokenizer, spec.tasks, items=items, seed=seed, data_dir=data_dir,
                              batch_size=batch_size)
