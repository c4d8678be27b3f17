"""GPTQ as a plan step: the pass feeds each layer the treated block's inputs, the recipe and the
export reproduce its weights, and a block-streamed model gives the resident model's numbers."""

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

import qdoctor
from export.ct_reference import assert_stored_as_qdoctor, loader_semantics, read_tensors
from helpers import cli_reports_whole_and_streamed
from qdoctor.calib.collect import CalibrationConfig
from qdoctor.errors import QDoctorError
from qdoctor.export import export_checkpoint
from qdoctor.models.lazy import load_lazy
from qdoctor.models.registry import arch_for, get_blocks
from qdoctor.policy.recipe import NAMED_RECIPES, Recipe, load_recipe
from qdoctor.quant.fake import fake_quantize, quantize as quantize_codes
from qdoctor.quant.gptq import GPTQConfig, gptq_quantize
from qdoctor.quant.linear import QuantLinear

CAL = CalibrationConfig(n_samples=8, seqlen=64)


def sq_gptq(scheme="w8a8-channel-tensor-static", **gptq):
    r = NAMED_RECIPES["smoothquant-gptq"](scheme)
    return dataclasses.replace(r, calibration=CAL, gptq=GPTQConfig(**gptq))


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return qdoctor.load(str(tiny_llama_dir), dtype="fp32", device="cpu")


def test_gptq_pass_uses_the_smoothed_blocks_inputs(tiny):
    """Second derivation: smooth a copy of the whole model, record every linear's inputs in one
    ordinary forward, build H = 2XᵀX/n in fp64 and run GPTQ layer by layer."""
    model, tok = tiny
    recipe = sq_gptq()
    stats = recipe.statistics(model, tok)
    store = recipe.gptq_weights(model, tok, stats)
    ref = copy.deepcopy(model)
    for i, block in enumerate(get_blocks(ref)):
        recipe.smooth_block(ref, i, block, stats)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda _m, a, _n=n: inputs.setdefault(_n, []).append(a[0].reshape(
        -1, a[0].shape[-1]).double())) for n, m in ref.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    with torch.no_grad():
        for s in range(0, stats.input_ids.shape[0], CAL.batch_size):
            ref(stats.input_ids[s:s + CAL.batch_size])
    for h in hooks:
        h.remove()
    checked = 0
    for i in range(len(get_blocks(ref))):
        got = store.block(i)
        assert len(got) == len(arch_for(ref).linears)
        for name, (w_hat, scale) in got.items():
            x = torch.cat(inputs[name])
            H = (2 * x.T @ x / x.shape[0]).float()
            w = ref.get_submodule(name).weight.detach()
            spec = recipe.scheme.resolve(name).weights
            expect, s_expect = gptq_quantize(w, H, spec)
            assert torch.equal(scale, s_expect), name
            assert torch.equal(fake_quantize(w_hat, spec, scale), w_hat), name
            # same numbers up to fp32 summation order: at most a rare one-step flip at a rounding tie
            assert (w_hat != expect).float().mean() < 1e-3, name
            y = x.float() @ w.T
            assert (y - x.float() @ w_hat.T).norm() < (y - x.float() @ fake_quantize(w, spec).T).norm(), name
            checked += 1
    assert checked == 14


def test_export_holds_the_gptq_codes_and_round_trips(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = tiny
    recipe = sq_gptq()
    stats = recipe.statistics(model, tok)
    out = tmp_path / "ckpt"
    export_checkpoint(model, tok, out, recipe=recipe, stats=stats, progress=False)
    tensors = read_tensors(out)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    store = recipe.gptq_weights(model, tok, stats)
    with recipe.applied(model, tok, stats):
        assert assert_stored_as_qdoctor(model, tensors) == 14  # codes and scales of the applied plan
        layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        moved = 0
        for i in range(2):
            for name, (w_hat, scale) in store.block(i).items():
                assert torch.equal(layers[name].weight.detach(), w_hat), name
                codes, _ = quantize_codes(w_hat, layers[name].scheme.weights, scale)
                assert torch.equal(tensors[f"{name}.weight"], codes), name
                rtn, _ = quantize_codes(layers[name].original_weight[0].detach(), layers[name].scheme.weights, scale)
                moved += int((rtn != codes).sum())
        assert moved > 0  # GPTQ chose other grid points than rounding to nearest
        with torch.no_grad(), loader_semantics(model):
            sim = model(ids).logits
    with torch.no_grad():
        got = loaded(ids).logits
    assert (got - sim).abs().max().item() <= 1e-4 * got.abs().max().item()
    # the model is as it was
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_export_verification_scores_the_written_gptq_weights(tiny, tmp_path, monkeypatch):
    """The verification measures the GPTQ weights the checkpoint holds: one GPTQ pass per export (it
    ran three before: the write, the simulation, the loader-rule simulation — 10 minutes of a SmolLM2
    export on 2 cores), and the simulation equals the recipe's own perplexity with a fresh pass."""
    from qdoctor.calib.text import text_source
    from qdoctor.eval.perplexity import token_windows
    from qdoctor.export.verify import VerifySpec
    from qdoctor.models.registry import bos_token_id
    from qdoctor.policy import recipe as recipe_mod

    model, tok = tiny
    recipe = sq_gptq()
    stats = recipe.statistics(model, tok)
    windows = token_windows(tok, text_source("wikitext2:test"), 64, bos_token_id(model, tok))[:2]
    passes = []
    real_pass = recipe_mod.gptq_pass
    monkeypatch.setattr(recipe_mod, "gptq_pass", lambda *a, **k: passes.append(1) or real_pass(*a, **k))
    report = export_checkpoint(model, tok, tmp_path / "ckpt", recipe=recipe, stats=stats, progress=False,
                               verify=VerifySpec(windows=windows))
    assert len(passes) == 1
    v = report.verification
    assert v["ok"], v
    assert v["simulated_ppl"] == pytest.approx(recipe.perplexity(model, tok, windows, stats)[0].ppl, rel=1e-6)
    assert len(passes) == 2  # the reference above ran its own pass


def test_streamed_gptq_plan_scores_as_resident(tiny, tiny_llama_dir):
    model, tok = tiny
    recipe = sq_gptq("w8a8-channel-token", act_order=True, propagate=True)
    windows = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    resident, _ = recipe.perplexity(model, tok, windows)
    lazy = load_lazy(tiny_llama_dir, dtype=torch.float32, device="cpu")
    streamed, applied = recipe.perplexity(lazy, tok, windows)
    assert streamed.ppl == pytest.approx(resident.ppl, rel=1e-6)
    assert len(applied.layers) == 14
    rtn, _ = dataclasses.replace(recipe, gptq=None).perplexity(model, tok, windows)
    assert rtn.ppl != resident.ppl  # GPTQ changed the plan's numbers


def test_recipe_records_gptq_and_names_resolve(tmp_path):
    r = sq_gptq(dampening=0.02, act_order=True)
    d = r.to_dict()
    assert d["gptq"] == {"dampening": 0.02, "act_order": True, "block_size": 128, "propagate": False}
    assert Recipe.from_dict(d) == r
    assert "gptq" not in dataclasses.replace(r, gptq=None).to_dict()
    with pytest.raises(QDoctorError):
        Recipe.from_dict({**d, "gptq": {"dampening": 2}})
    named = load_recipe("smoothquant-gptq:w8a8-tensor-tensor-static")
    assert named.scheme.name == "w8a8-tensor-tensor-static" and named.gptq == GPTQConfig()
    assert [(s.method, s.alpha, s.layers) for s in named.smoothing] == [("smoothquant", 0.8, ("*",))]
    assert load_recipe("smoothquant-gptq").scheme.name == "w8a8-channel-token"
    with pytest.raises(QDoctorError):
        load_recipe("smoothquant-gptq:no-such-scheme")


def test_quantize_cli_gptq_recipe_whole_and_streamed(tiny_llama_dir, tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(sq_gptq().dumps())  # the named recipe with a small calibration
    args = ["quantize", "--model", str(tiny_llama_dir), "--dtype", "fp32", "--recipe", str(path),
            "--seqlen", "64", "--limit", "1"]
    whole, streamed = cli_reports_whole_and_streamed(tmp_path, args)
    assert streamed["quantized"]["ppl"] == pytest.approx(whole["quantized"]["ppl"], rel=1e-6)
    assert whole["quantized_layers"] == 14


def test_search_tries_gptq_when_asked():
    from helpers import tiny_model, tiny_tokenizer
    from qdoctor.policy.search import FixConfig, search

    model, tok = tiny_model("llama"), tiny_tokenizer()
    cal = CalibrationConfig(n_samples=8, seqlen=64, sample_rows=64, holdout_fraction=0.2)
    cfg = FixConfig(target="w8a8-tensor-static", budget_pct=0.0, eval_windows=2, eval_seqlen=64, alphas=(0.5,),
                    max_layer_fraction=0.0, weight_error_threshold=1.0, calibration=cal, gptq=GPTQConfig())
    r = search(model, tok, cfg, progress=False)
    labels = [t.label for t in r.trials]
    assert any(lb.endswith("+gptq") for lb in labels), labels
    assert r.best.value == min(t.value for t in r.trials)
    assert (r.recipe.gptq is not None) == ("+gptq" in r.best.label)
    assert Recipe.from_dict(r.recipe.to_dict()).gptq == r.recipe.gptq
