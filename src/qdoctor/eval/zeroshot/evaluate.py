"""``evaluate(model, tokenizer, tasks)``: zero-shot accuracy on the shipped tasks, offline.

    from qdoctor.eval.zeroshot import evaluate
    results = evaluate(model, tok, tasks=["piqa", "arc_easy"], limit=200)
    results["piqa"].metrics        # {"acc": 0.66, "acc_stderr": 0.033, "acc_norm": ..., ...}
    results["piqa"].items[0]       # ItemResult(index=0, label=0, loglikelihoods=[...], pred=0, ...)
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qdoctor.distributed import World, current_world
from qdoctor.errors import QDoctorError
from qdoctor.eval.zeroshot import metrics as M
from qdoctor.eval.zeroshot.data import TaskDataError, choose_indices, find_task_file, read_jsonl
from qdoctor.eval.zeroshot.encoding import PairEncoder, bos_policy, resolve_max_length
from qdoctor.eval.zeroshot.scorer import LoglikelihoodScorer
from qdoctor.eval.zeroshot.tasks import DEFAULT_TASKS, Item, RecordError, TaskSpec, get_task


@dataclass
class ItemResult:
    index: int  # 0-based record index in the task file
    label: int | None  # gold choice (None for LAMBADA)
    loglikelihoods: list[float]  # one per request (choice)
    is_greedy: list[bool]  # every continuation token was the argmax
    pred: int | None = None  # argmax of loglikelihoods (multiple choice)
    pred_norm: int | None = None  # argmax of loglikelihood / len(choice)
    pred_bytes: int | None = None  # argmax of loglikelihood / UTF-8 bytes of choice

    @property
    def correct(self) -> bool:
        return self.is_greedy[0] if self.label is None else self.pred == self.label


@dataclass
class TaskResult:
    task: str
    metrics: dict[str, float]  # lm-eval's metric set for the task, each with <name>_stderr
    n_items: int  # items scored
    n_total: int  # items in the data file
    n_requests: int
    seconds: float  # wall time: tokenization + scoring
    data_file: str
    items: list[ItemResult] = field(default_factory=list, repr=False)

    def __getattr__(self, name: str):  # results["piqa"].acc, .acc_norm, .perplexity
        metrics = self.__dict__.get("metrics", {})
        if name in metrics:
            return metrics[name]
        raise AttributeError(name)

    def to_dict(self, include_items: bool = False) -> dict:
        d = asdict(self)
        if not include_items:
            d.pop("items")
        return d


def load_items(task: "str | TaskSpec", data_dir: "str | Path | None" = None,
               path: "str | Path | None" = None) -> tuple[Path, list[Item]]:
    """All items of ``task`` from ``path``, ``<data_dir>/<task>.jsonl[.gz]`` or the shipped file.

    Every record is validated; the first bad one raises ``TaskDataError`` (file:line: why)."""
    spec = get_task(task) if isinstance(task, str) else task
    file = Path(path) if path is not None else find_task_file(spec.name, data_dir)
    items = []
    for lineno, record in read_jsonl(file):
        try:
            items.append(spec.build(record, len(items)))
        except RecordError as e:
            raise TaskDataError(file, lineno, f"{spec.name}: {e} (schema: {spec.schema})") from None
    if not items:
        raise TaskDataError(file, None, f"{spec.name}: no records")
    return file, items


def _per_task(value, task: str):
    return value.get(task) if isinstance(value, dict) else value


def _task_metrics(spec: TaskSpec, items: list[ItemResult]) -> dict[str, float]:
    out: dict[str, float] = {}

    def put(name: str, values: list[float]):
        out[name] = M.mean(values)
        out[f"{name}_stderr"] = M.mean_stderr(values)

    if spec.kind == "loglikelihood":
        put("acc", [float(it.is_greedy[0]) for it in items])
        lls = [it.loglikelihoods[0] for it in items]
        ppl = math.exp(-M.mean(lls))
        out["perplexity"] = ppl
        out["perplexity_stderr"] = ppl * M.mean_stderr(lls)
        return out
    put("acc", [float(it.pred == it.label) for it in items])
    if "acc_norm" in spec.metrics:
        put("acc_norm", [float(it.pred_norm == it.label) for it in items])
        put("acc_bytes", [float(it.pred_bytes == it.label) for it in items])
    return out


def score_items(spec: TaskSpec, items: list[Item], encoder: PairEncoder, scorer: LoglikelihoodScorer,
                desc: str | None = None) -> list[ItemResult]:
    """Tokenize and score ``items``; predictions as lm-eval's ``process_results``."""
    pairs = [[encoder.encode_pair(c, x) for c, x in zip(it.contexts, it.continuations)] for it in items]
    scored = scorer.score(pairs, desc=desc or spec.name)
    results = []
    for it, res in zip(items, scored):
        lls = [ll for ll, _ in res]
        greedy = [g for _, g in res]
        r = ItemResult(it.index, it.label, lls, greedy)
        if spec.kind == "multiple_choice":
            r.pred = M.argmax(lls)
            r.pred_norm = M.argmax(M.normalized(lls, [len(c) for c in it.choices]))
            r.pred_bytes = M.argmax(M.normalized(lls, [len(c.encode("utf-8")) for c in it.choices]))
        results.append(r)
    return results


def evaluate(model, tokenizer, tasks: "list[str] | tuple[str, ...] | None" = None,
             limit: "int | dict[str, int] | None" = None, subsample: "int | dict[str, int] | None" = None,
             seed: int = 1234, batch_size: int = 16, data_dir: "str | Path | None" = None, *,
             share_prefix: bool = True, add_bos_token: bool | None = None, max_length: int | None = None,
             progress: bool = True, world: World | None = None) -> dict[str, TaskResult]:
    """Zero-shot evaluation of ``model`` on ``tasks`` (default: the eight of ``DEFAULT_TASKS``).

    model: any causal LM whose ``model(input_ids=..., attention_mask=...)`` returns ``.logits``
        (quantized qdoctor models included).
    limit / subsample: the first N items, or N items drawn with ``seed`` — an int for every
        task or a {task: N} mapping.
    batch_size: distinct input sequences per forward, counted as lm-eval's HFLM counts its
        batch (choices with the same context + continuation[:-1] are one); an item's choices
        stay in one batch.
    data_dir: a folder with ``<task>.jsonl[.gz]`` files in the task schemas (docs/zeroshot.md),
        used instead of the shipped data.
    add_bos_token: as lm-eval HFLM's model_arg (None: the tokenizer's default).
    share_prefix: run each item's shared token prefix once (exact; off = full sequences).
    world: over several ranks (default ``qdoctor.distributed.current_world()``) each scores a
        contiguous shard of every task's items; the item results are gathered in item order
        and every rank computes the metrics of all of them (sums over items, not means of means).
    """
    world = current_world() if world is None else world
    task_names = [tasks] if isinstance(tasks, str) else list(tasks) if tasks is not None else list(DEFAULT_TASKS)
    specs = [get_task(t) for t in task_names]
    if len(set(task_names)) != len(task_names):
        raise QDoctorError(f"a task is listed twice: {task_names}")
    encoder = PairEncoder(tokenizer, add_bos_token=add_bos_token, force_bos=bos_policy(model, tokenizer))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scorer = LoglikelihoodScorer(model, batch_size=batch_size, share_prefix=share_prefix, pad_id=pad_id,
                                 max_length=max_length or resolve_max_length(model, tokenizer),
                                 progress=progress and world.is_main)
    was_training = model.training
    model.eval()
    results: dict[str, TaskResult] = {}
    try:
        for spec in specs:
            file, items = load_items(spec, data_dir)
            chosen = [items[i] for i in choose_indices(len(items), _per_task(limit, spec.name),
                                                       _per_task(subsample, spec.name), seed)]
            t0 = time.perf_counter()
            scored = world.concat(score_items(spec, chosen[world.shard(len(chosen))], encoder, scorer))
            results[spec.name] = TaskResult(
                task=spec.name, metrics=_task_metrics(spec, scored), n_items=len(scored), n_total=len(items),
                n_requests=sum(len(it.contexts) for it in chosen), seconds=time.perf_counter() - t0,
                data_file=str(file), items=scored)
    finally:
        model.train(was_training)
    return results


def format_table(results: dict[str, TaskResult]) -> str:
    """A Markdown table: task, items, acc ± stderr, acc_norm ± stderr, perplexity, seconds."""
    def cell(r: TaskResult, name: str) -> str:
        if name not in r.metrics:
            return "—"
        return f"{r.metrics[name]:.4f} ± {r.metrics[name + '_stderr']:.4f}"

    lines = ["| task | items | acc | acc_norm | perplexity | seconds |", "|---|---:|---:|---:|---:|---:|"]
    for r in results.values():
        lines.append(f"| {r.task} | {r.n_items}/{r.n_total} | {cell(r, 'acc')} | {cell(r, 'acc_norm')} | "
                     f"{cell(r, 'perplexity')} | {r.seconds:.1f} |")
    return "\n".join(lines)
