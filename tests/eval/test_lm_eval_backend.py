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


def local_task_dir(tmp_path, task: str = "piqa"):
    """A folder for --include_path with ``qd_<task>``: lm-eval's own task YAML (included) over our local
    file, so lm-eval runs offline."""
    import lm_eval

    spec = get_task(task)
    data, _ = load_items(spec)
    folder = tmp_path / "tasks"
    folder.mkdir(exist_ok=True)
    (folder / f"qd_{task}.yaml").write_text(
        f"include: {lm_eval.__path__[0]}/tasks/{spec.lm_eval_config}\ntask: qd_{task}\ndataset_path: json\n"
        f"dataset_name: null\ndataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {tmp_path / 'hf'}\n"
        "training_split: null\nvalidation_split: null\ntest_split: test\n")
    return folder


def test_lm_eval_cli_with_model_qdoctor(tiny_llama_dir, tmp_path):
    """`qdoctor-lm-eval` (the console script; `python -m qdoctor.eval.lm_eval_backend` where it is not
    installed) is lm-eval's CLI with --model qdoctor available, lm-eval's own arguments unchanged; its
    accuracy on the first 4 PIQA items is what `qdoctor eval --tasks piqa --limit 4` reports."""
    import json
    import os
    import shutil

    from qdoctor.cli import main

    folder = local_task_dir(tmp_path)
    script = shutil.which("qdoctor-lm-eval")
    cmd = [script] if script else [sys.executable, "-m", "qdoctor.eval.lm_eval_backend"]
    cmd += ["--model", "qdoctor", "--model_args", f"pretrained={tiny_llama_dir},dtype=fp32", "--tasks", "qd_piqa",
            "--include_path", str(folder), "--limit", "4", "--device", "cpu", "--batch_size", "2",
            "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ,
                                                                                 "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "qd_piqa" in proc.stdout and "acc_norm" in proc.stdout
    lm_eval_acc = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["qd_piqa"]
    report = tmp_path / "ours.json"
    assert main(["eval", "--model", str(tiny_llama_dir), "--tasks", "piqa", "--limit", "4", "--json", str(report)]) == 0
    rows = {r["metric"]: r for r in json.loads(report.read_text())["rows"] if r["plan"] == "full-precision"}
    assert rows["acc"]["items"] == 4
    for metric in ("acc", "acc_norm"):
        assert lm_eval_acc[f"{metric},none"] == pytest.approx(rows[metric]["value"], abs=1e-9)


def test_simple_evaluate_by_name_with_an_lc_recipe_equals_qdoctor_eval(tiny_llama_dir, tmp_path):
    """The Python API after `import qdoctor.eval.lm_eval_backend`: model="qdoctor" with model_args as a
    string, recipe= an llm-compressor recipe; accuracy equals `qdoctor eval --tasks … --recipe` on the same
    items (FP8 per-token dynamic: no calibration, and batching cannot change the numbers)."""
    import json
    import logging

    import lm_eval
    from lm_eval.tasks import TaskManager

    from qdoctor.cli import main

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lc = tmp_path / "lc.yaml"
    lc.write_text("quant_stage:\n  quant_modifiers:\n    QuantizationModifier: {scheme: FP8_DYNAMIC, "
                  "ignore: [lm_head]}\n")
    folder = local_task_dir(tmp_path, "arc_easy")
    out = lm_eval.simple_evaluate(model="qdoctor", model_args=f"pretrained={tiny_llama_dir},recipe={lc},dtype=fp32",
                                  tasks=["qd_arc_easy"], task_manager=TaskManager(include_path=str(folder)), limit=5,
                                  device="cpu", bootstrap_iters=0, verbosity="ERROR")
    got = out["results"]["qd_arc_easy"]
    report = tmp_path / "ours.json"
    assert main(["eval", "--model", str(tiny_llama_dir), "--tasks", "arc_easy", "--limit", "5", "--recipe", str(lc),
                 "--json", str(report)]) == 0
    rows = {r["metric"]: r for r in json.loads(report.read_text())["rows"] if r["plan"] != "full-precision"}
    assert rows["acc"]["items"] == 5
    for metric in ("acc", "acc_norm"):
        assert got[f"{metric},none"] == pytest.approx(rows[metric]["value"], abs=1e-9)


def test_module_object_keeps_working_after_lm_eval(tiny_llama_dir):
    # HFLM calls model.eval() and tie_weights(); the model stays a usable nn.Module.
    lm = _quiet_hflm(pretrained=str(tiny_llama_dir), batch_size=1, device="cpu")
    with torch.no_grad():
        assert lm.model(torch.tensor([[1, 2, 3]])).logits.shape[:2] == (1, 3)
