"""Done-criterion of issue 6: on the real SmolLM2-135M, qdoctor's per-item predictions equal
lm-eval's — lm-eval's own task objects (its YAML over our files) scored by its ``hf`` model
(HFLM wrapping the same model object) and judged by its ``process_results``."""

import numpy as np
import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("datasets")

from qdoctor.eval.zeroshot import evaluate, get_task, load_items  # noqa: E402
from qdoctor.eval.zeroshot.agreement import build_lm_eval_task, make_hflm  # noqa: E402

N_ITEMS = 100


@pytest.mark.slow
@pytest.mark.parametrize("task", ["hellaswag", "winogrande"])
def test_predictions_equal_lm_eval_hf_backend(smollm2, task, tmp_path):
    model, tok = smollm2
    spec = get_task(task)
    path, _ = load_items(spec)
    lm_task = build_lm_eval_task(spec, path, cache_dir=str(tmp_path))
    docs = list(lm_task.eval_docs)[:N_ITEMS]
    per_doc = [lm_task.construct_requests(doc=d, ctx=lm_task.fewshot_context(d, 0), metadata=(task, i, 1))
               for i, d in enumerate(docs)]
    responses = make_hflm(model, tok, batch_size=16).loglikelihood([r for reqs in per_doc for r in reqs],
                                                                   disable_tqdm=True)
    lm_lls, lm_metrics, k = [], [], 0
    for doc, reqs in zip(docs, per_doc):
        res = responses[k:k + len(reqs)]
        k += len(reqs)
        lm_lls.append([ll for ll, _ in res])
        lm_metrics.append(lm_task.process_results(doc, res))

    ours = evaluate(model, tok, tasks=[task], limit=N_ITEMS, batch_size=16, progress=False)[task]

    assert [it.pred for it in ours.items] == [int(np.argmax(lls)) for lls in lm_lls]
    assert [float(it.pred == it.label) for it in ours.items] == [m["acc"] for m in lm_metrics]
    if "acc_norm" in spec.metrics:
        assert [float(it.pred_norm == it.label) for it in ours.items] == [m["acc_norm"] for m in lm_metrics]
    diffs = [abs(a - b) for it, lls in zip(ours.items, lm_lls) for a, b in zip(it.loglikelihoods, lls)]
    assert max(diffs) < 1e-3
    assert ours.acc == pytest.approx(float(np.mean([m["acc"] for m in lm_metrics])))
