"""Export against a serving profile: refusal before any write, the format the runtime reads
(pack-quantized for the Humming path), and --verify in the staging directory."""

import json

import pytest
import torch

import qdoctor
from export.ct_reference import loader_semantics
from qdoctor.errors import QDoctorError
from qdoctor.eval.perplexity import perplexity
from qdoctor.export import export_checkpoint
from qdoctor.export.verify import VerifySpec, gap_pct
from qdoctor.quant.spec import Scheme
from qdoctor.serve.profiles import ServeProfile

W = lambda d, g: {"dtype": d, "granularity": g}  # noqa: E731
DYN = lambda d, g="token": {"dtype": d, "granularity": g, "dynamic": True}  # noqa: E731
GROUP_W8A8 = Scheme.from_dict({"name": "g", "default": {"weights": W("int8", "group:32"), "activations": DYN("int8")}})
MIXED_SHARDS = Scheme.from_dict({"name": "m", "default": {"weights": W("int8", "channel"), "activations": DYN("int8")},
                                 "overrides": {"model.layers.0.self_attn.k_proj": {"keep": "bf16"},
                                               "model.layers.1.mlp.down_proj": {"weights": W("int8", "tensor"),
                                                                                "activations": None}}})


def _load(tiny_llama_dir):
    return qdoctor.load(str(tiny_llama_dir), dtype="fp32", device="cpu")


def _windows(tok, n=2, seqlen=128):
    from qdoctor.calib.text import text_source
    from qdoctor.eval.perplexity import token_windows

    return token_windows(tok, text_source("wikitext2:test"), seqlen)[:n]


@pytest.mark.parametrize("serve", ["vllm", ServeProfile("vllm", "ampere")])
def test_violating_plan_refused_before_anything_is_written(tiny_llama_dir, tmp_path, serve):
    model, tok = _load(tiny_llama_dir)
    recipe = qdoctor.policy.recipe.Recipe.of(MIXED_SHARDS)
    with pytest.raises(QDoctorError) as e:
        export_checkpoint(model, tok, tmp_path / "x", recipe=recipe, serve=serve, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("vLLM cannot serve this plan")
    assert "fused-shards" in msg and "model.layers.0.self_attn.q_proj" in msg  # the layers are named
    assert "int8-weight-only" in msg and "model.layers.1.mlp.down_proj" in msg
    assert list(tmp_path.iterdir()) == []
    # the same plan for transformers is written, and the card says what vLLM would need
    report = export_checkpoint(model, tok, tmp_path / "t", recipe=recipe, serve="transformers", progress=False)
    card = (tmp_path / "t" / "README.md").read_text()
    assert "## Serving" in card and "cannot serve it as planned" in card and "fused-shards" in card
    assert report.serve["runtime"] == "transformers"


def test_humming_groups_are_pack_quantized_and_reload_exactly(tiny_llama_dir, tmp_path):
    model, tok = _load(tiny_llama_dir)
    recipe = qdoctor.policy.recipe.Recipe.of(GROUP_W8A8)
    with pytest.raises(QDoctorError, match="int8-group-w8a8"):
        export_checkpoint(model, tok, tmp_path / "no", recipe=recipe, serve="vllm", progress=False)
    windows = _windows(tok)
    profile = ServeProfile("vllm", allow_optional_kernels=True)
    out = tmp_path / "ckpt"
    report = export_checkpoint(model, tok, out, recipe=recipe, serve=profile, verify=VerifySpec(windows),
                               progress=False)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized"  # compressed-tensors alone would infer int-quantized
    assert {g["format"] for g in report.groups} == {"pack-quantized"}
    assert "CompressedTensorsWNA8Int" in (out / "README.md").read_text()
    # the verification's numbers, derived again here: the dir reloaded by hand, the plan simulated by hand
    from transformers import AutoModelForCausalLM

    v = report.verification
    again = perplexity(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32), tok, windows=windows,
                       progress=False).ppl
    assert again == pytest.approx(v["reloaded_ppl"], rel=1e-6)
    sim = recipe.perplexity(model, tok, windows)[0].ppl
    assert sim == pytest.approx(v["simulated_ppl"], rel=1e-9)
    # the loader's rule, derived apart (tests/export/ct_reference.py) on a model quantized in place
    qdoctor.quantize(model, GROUP_W8A8, progress=False)
    try:
        with loader_semantics(model):
            rule = perplexity(model, tok, windows=windows, progress=False).ppl
    finally:
        qdoctor.restore(model)
    assert rule == pytest.approx(v["loader_rule_ppl"], rel=1e-6)
    assert v["gap_pct"] == pytest.approx(gap_pct(again, rule), abs=1e-4) and abs(v["gap_pct"]) <= 0.3
    assert v["rounding_gap_pct"] == pytest.approx(gap_pct(again, sim), abs=1e-4)
    saved = json.loads((out / "qdoctor_export.json").read_text())["report"]["verification"]
    assert saved["reloaded_ppl"] == v["reloaded_ppl"] and f"{v['reloaded_ppl']:.4f}" in (out / "README.md").read_text()


def test_failed_verification_publishes_nothing(tiny_llama_dir, tmp_path, monkeypatch):
    import qdoctor.export.verify as verify

    model, tok = _load(tiny_llama_dir)
    recipe = qdoctor.policy.recipe.Recipe.of(qdoctor.quant.get_scheme("w8a8-channel-token"))
    out = tmp_path / "v"
    export_checkpoint(model, tok, out, recipe=recipe, progress=False)  # an older checkpoint at --out
    before = sorted(p.name for p in out.iterdir())
    # a checkpoint that reloads 1 % worse than the plan (as a broken export would)
    real = verify.reloaded_ppl
    monkeypatch.setattr(verify, "reloaded_ppl", lambda *a, **k: 1.01 * real(*a, **k))
    with pytest.raises(QDoctorError, match=r"export verification failed: reloaded checkpoint PPL .* nothing was written"):
        export_checkpoint(model, tok, out, recipe=recipe, verify=VerifySpec(_windows(tok, 1)), overwrite=True,
                          progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["v"] and sorted(p.name for p in out.iterdir()) == before
    assert "Verified" not in (out / "README.md").read_text()  # the old checkpoint, untouched
