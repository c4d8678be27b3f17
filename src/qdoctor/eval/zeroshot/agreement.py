"""Check qdoctor's zero-shot scores against lm-eval's own ``hf`` model (HFLM) on the same items.

Both sides get the same model object, the same tokenizer and the same (context,
continuation) strings; lm-eval does its own tokenization (``TemplateLM.loglikelihood``),
batching and scoring (``HFLM._loglikelihood_tokens``), and its predictions are computed as
``ConfigurableTask.process_results`` does (``np.argmax`` of log-likelihoods, of
log-likelihood / ``len(choice)``).

    python -m qdoctor.eval.zeroshot.agreement --model smollm2-135m --limit 200 --json /tmp/agree.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field

from qdoctor.eval.zeroshot.data import choose_indices
from qdoctor.eval.zeroshot.encoding import PairEncoder, resolve_max_length
from qdoctor.eval.zeroshot.evaluate import ItemResult, load_items, score_items
from qdoctor.eval.zeroshot.scorer import LoglikelihoodScorer
from qdoctor.eval.zeroshot.tasks import DEFAULT_TASKS, Item, TaskSpec, get_task


def make_hflm(model, tokenizer, batch_size: int = 16, **kwargs):
    """lm-eval's ``hf`` model wrapping an already-loaded model and tokenizer."""
    import logging

    from lm_eval.models.huggingface import HFLM

    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)  # HFLM warns that an in-memory model ignores some arguments
    try:
        device = str(next(model.parameters()).device)
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, **kwargs)
    finally:
        logger.setLevel(level)


def lm_eval_score(hflm, spec: TaskSpec, items: list[Item], progress: bool = False) -> list[ItemResult]:
    """Score ``items`` with HFLM.loglikelihood; predictions as lm-eval's process_results."""
    import numpy as np
    from lm_eval.api.instance import Instance

    instances = [Instance(request_type="loglikelihood", doc={}, arguments=(c, x), idx=j,
                          metadata=(spec.name, it.index, 1))
                 for it in items for j, (c, x) in enumerate(zip(it.contexts, it.continuations))]
    responses = hflm.loglikelihood(instances, disable_tqdm=not progress)
    out, k = [], 0
    for it in items:
        res = responses[k:k + len(it.contexts)]
        k += len(it.contexts)
        lls = [float(ll) for ll, _ in res]
        r = ItemResult(it.index, it.label, lls, [bool(g) for _, g in res])
        if spec.kind == "multiple_choice":
            arr = np.array(lls)
            r.pred = int(np.argmax(arr))
            r.pred_norm = int(np.argmax(arr / np.array([float(len(c)) for c in it.choices])))
            r.pred_bytes = int(np.argmax(arr / np.array([float(len(c.encode("utf-8"))) for c in it.choices])))
        out.append(r)
    return out


def build_lm_eval_task(spec: TaskSpec, data_file, cache_dir: str | None = None):
    """lm-eval's own ``ConfigurableTask`` for ``spec``, from the installed task YAML, reading our file.

    Only the data source changes (``dataset_path: json`` over ``data_file`` as the test split,
    no few-shot split); prompts, choices, targets, delimiters and metrics are lm-eval's. Two
    tasks read fields of our stored form: HellaSwag's stored record is already lm-eval's
    processed doc (``process_docs`` dropped), and WinoGrande's is the partial-scoring form
    (doc_to_text/choice/target read ``label``/``contexts``/``continuation``; lm-eval's
    multiple-input machinery does the rest).
    """
    from pathlib import Path

    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(Path(lm_eval.__file__).parent / "tasks" / spec.lm_eval_config)
    for key in ("tag", "group", "training_split", "validation_split", "fewshot_split", "dataset_name"):
        config.pop(key, None)
    kwargs = {"data_files": {"test": str(data_file)}}
    if cache_dir is not None:
        kwargs["cache_dir"] = cache_dir
    config.update(task=f"qdoctor_{spec.name}", dataset_path="json", dataset_kwargs=kwargs, test_split="test")
    if spec.name == "hellaswag":
        config.pop("process_docs", None)
    if spec.name == "winogrande":
        config.update(doc_to_text=lambda d: d["label"], doc_to_choice=lambda d: d["contexts"],
                      doc_to_target=lambda d: d["continuation"])
    return ConfigurableTask(config=config)


@dataclass
class Agreement:
    task: str
    n_items: int
    pred_agreement: float  # fraction of items with the same prediction (LAMBADA: same greedy flag)
    pred_norm_agreement: float | None
    max_abs_loglik_diff: float
    acc_qdoctor: float
    acc_lm_eval: float
    seconds_qdoctor: float
    seconds_lm_eval: float
    disagreements: list[int] = field(default_factory=list)  # item indices in the task file

    @property
    def speedup(self) -> float:
        return self.seconds_lm_eval / self.seconds_qdoctor


def compare(model, tokenizer, tasks=None, limit: int | None = None, subsample: int | None = None,
            seed: int = 1234, batch_size: int = 16, lm_eval_batch_size: int | None = None,
            progress: bool = True) -> dict[str, Agreement]:
    encoder = PairEncoder(tokenizer)  # lm-eval defaults (no forced BOS)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scorer = LoglikelihoodScorer(model, batch_size=batch_size, max_length=resolve_max_length(model, tokenizer),
                                 pad_id=pad_id, progress=progress)
    hflm = make_hflm(model, tokenizer, batch_size=lm_eval_batch_size or batch_size)
    out = {}
    for name in tasks or DEFAULT_TASKS:
        spec = get_task(name)
        _, items = load_items(spec)
        items = [items[i] for i in choose_indices(len(items), limit, subsample, seed)]
        t0 = time.perf_counter()
        ours = score_items(spec, items, encoder, scorer)
        t1 = time.perf_counter()
        ref = lm_eval_score(hflm, spec, items, progress=progress)
        t2 = time.perf_counter()
        mc = spec.kind == "multiple_choice"
        same = [(a.pred == b.pred) if mc else (a.is_greedy == b.is_greedy) for a, b in zip(ours, ref)]
        out[name] = Agreement(
            task=name, n_items=len(items), pred_agreement=sum(same) / len(same),
            pred_norm_agreement=(sum(a.pred_norm == b.pred_norm for a, b in zip(ours, ref)) / len(ours)
                                 if mc else None),
            max_abs_loglik_diff=max(abs(x - y) for a, b in zip(ours, ref)
                                    for x, y in zip(a.loglikelihoods, b.loglikelihoods)),
            acc_qdoctor=sum(a.correct for a in ours) / len(ours), acc_lm_eval=sum(b.correct for b in ref) / len(ref),
            seconds_qdoctor=t1 - t0, seconds_lm_eval=t2 - t1,
            disagreements=[a.index for a, s in zip(ours, same) if not s])
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="per-item agreement of qdoctor zero-shot scoring with lm-eval's HFLM")
    ap.add_argument("--model", default="smollm2-135m", help="anything qdoctor.load accepts")
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    ap.add_argument("--limit", type=int, default=None, help="first N items per task")
    ap.add_argument("--subsample", type=int, default=None, help="N random items per task (--seed)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    import qdoctor

    model, tok = qdoctor.load(args.model, dtype="fp32")
    results = compare(model, tok, args.tasks.split(","), limit=args.limit, subsample=args.subsample,
                      seed=args.seed, batch_size=args.batch_size)
    print("| task | items | pred agree | pred_norm agree | max |Δ loglik| | acc qdoctor | acc lm-eval | s qdoctor | s lm-eval | speedup |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for a in results.values():
        norm = f"{a.pred_norm_agreement:.4f}" if a.pred_norm_agreement is not None else "—"
        print(f"| {a.task} | {a.n_items} | {a.pred_agreement:.4f} | {norm} | {a.max_abs_loglik_diff:.2e} | "
              f"{a.acc_qdoctor:.4f} | {a.acc_lm_eval:.4f} | {a.seconds_qdoctor:.1f} | {a.seconds_lm_eval:.1f} | "
              f"{a.speedup:.2f}x |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({k: {**asdict(v), "speedup": v.speedup} for k, v in results.items()}, fh, indent=2)


if __name__ == "__main__":
    main()
