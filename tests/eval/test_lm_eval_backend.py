"""The lm-eval model type ``qdoctor`` (HFLM over qdoctor-loaded, optionally quantized models),
checked against our own scorer and run through lm-eval's evaluator and CLI on local task data."""

import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("datasets")

from helpers import tiny_model, tiny_tokenizer  # noqa: E402
from qdoctor.errors import QDoctorError  # noqa: E402
from qdoctor.eval.lm_eval_backend import QDoctorLM  # noqa: E402
from qdoctor.eval.zeroshot import LoglikelihoodScorer, PairEncoder, evaluate, get_task, load_items  # noqa: E402
from qdoctor.eval.zeroshot.agreement import build_lm_eval_task  # noqa: E402


def _quiet_hflm(**kwargs):
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return QDoctorLM(**kwargs)


def test_registered_without_hiding_lm_eval_models():
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM

    assert get_model("qdoctor") is QDoctorLM and issubclass(QDoctorLM, HFLM)
    assert get_model("hf") is HFLM  # lm-eval's own models are still registered


def test_loads_by_name_and_scores_like_qdoctor(tiny_llama_dir):
    from lm_eval.api.instance import Instance

    lm = _quiet_hflm(pretrained=str(tiny_llama_dir), batch_size=4, device="cpu")
    assert lm.model.qdoctor_source == str(tiny_llama_dir) and lm.quantize_result is None
    _, items = load_items("arc_easy")
    pairs = [(c, x) for it in items[:3] for c, x in zip(it.contexts, it.continuations)]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    enc = PairEncoder(lm.tokenizer)
    scorer = LoglikelihoodScorer(lm.model, batch_size=4, max_length=512, progress=False)
    ours = scorer.score([[enc.encode_pair(c, x) for c, x in pairs]])[0]
    for (a, ga), (b, gb) in zip(got, ours):
        assert a == pytest.approx(b, abs=2e-4) and ga == gb


def test_scheme_quantizes_and_evaluator_matches_our_evaluate(tiny_llama_dir, tmp_path):
    """lm-eval's own evaluator on lm-eval's PIQA config over our file, with a W8A8 model."""
    import lm_eval
    from qdoctor.quant.linear import QuantLinear

    lm = _quiet_hflm(pretrained=str(tiny_llama_dir), scheme="w8a8-channel-token", batch_size=1, device="cpu")
    assert any(isinstance(m, QuantLinear) for m in lm.model.modules())
    spec = get_task("piqa")
    path, _ = load_items(spec)
    task = build_lm_eval_task(spec, path, cache_dir=str(tmp_path))
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=6, log_samples=True, bootstrap_iters=0,
                                  verbosity="ERROR")
    samples = sorted(out["samples"][task.config.task], key=lambda s: s["doc_id"])
    # Per-tensor-free scheme (per-token dynamic): batching cannot change the numbers.
    ours = evaluate(lm.model, lm.tokenizer, tasks=["piqa"], limit=6, batch_size=1, progress=False)["piqa"]
    assert [s["acc"] for s in samples] == [float(it.pred == it.label) for it in ours.items]
    assert [s["acc_norm"] for s in samples] == [float(it.pred_norm == it.label) for it in ours.items]
    for s, it in zip(samples, ours.items):
        assert [r[0][0] for r in s["resps"]] == pytest.approx(it.loglikelihoods, abs=2e-4)


def test_bos_is_forced_like_zeroshot_for_gemma():
    model, tok = tiny_model("gemma3_text"), tiny_tokenizer()
    lm = _quiet_hflm(pretrained=model, tokenizer=tok, batch_size=1)
    ctx, cont = lm._encode_pair("Question: why?\nAnswer:", " because")
    assert ctx[0] == tok.bos_token_id
    assert (ctx, cont) == PairEncoder(tok, force_bos=True).encode_pair("Question: why?\nAnswer:", " because")
    ids, _ = lm.tok_batch_encode(["hello", "<bos>world"])
    assert ids[:, 0].tolist().count(tok.bos_token_id) + ids[:, 1].tolist().count(tok.bos_token_id) >= 2


def test_argument_errors(tiny_llama_dir):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(QDoctorError, match="needs its tokenizer"):
        QDoctorLM(pretrained=model)
    with pytest.raises(QDoctorError, match="not both"):
        QDoctorLM(pretrained=model, tokenizer=tok, recipe="r.yaml", scheme="w8a8-channel-token")
    with pytest.raises(QDoctorError, match="unknown scheme"):
        QDoctorLM(pretrained=model, tokenizer=tok, scheme="w3a3")


def test_lm_eval_cli_with_model_qdoctor(tiny_llama_dir, tmp_path):
    """`python -m qdoctor.eval.lm_eval_backend` is lm-eval's CLI with --model qdoctor available;
    the task is lm-eval's own piqa.yaml (included) over our local file."""
    import lm_eval

    piqa_yaml = f"{lm_eval.__path__[0]}/tasks/piqa/piqa.yaml"
    data, _ = load_items("piqa")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "qd_piqa.yaml").write_text(
        f"include: {piqa_yaml}\ntask: qd_piqa\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {tmp_path / 'hf'}\n"
        "training_split: null\nvalidation_split: null\ntest_split: test\n")
    cmd = [sys.executable, "-m", "qdoctor.eval.lm_eval_backend", "--model", "qdoctor",
           "--model_args", f"pretrained={tiny_llama_dir},dtype=fp32", "--tasks", "qd_piqa",
           "--include_path", str(tmp_path / "tasks"), "--limit", "4", "--device", "cpu", "--batch_size", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={"HF_DATASETS_OFFLINE": "1",
                                                                                 **__import__("os").environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "qd_piqa" in proc.stdout and "acc_norm" in proc.stdout


def test_module_object_keeps_working_after_lm_eval(tiny_llama_dir):
    # HFLM calls model.eval() and tie_weights(); the model stays a usable nn.Module.
    lm = _quiet_hflm(pretrained=str(tiny_llama_dir), batch_size=1, device="cpu")
    with torch.no_grad():
        assert lm.model(torch.tensor([[1, 2, 3]])).logits.shape[:2] == (1, 3)
