import pytest
import torch

from helpers import tiny_model, tiny_tokenizer
from qdoctor.calib.collect import CalibrationConfig
from qdoctor.errors import QDoctorError
from qdoctor.policy.recipe import Recipe, load_recipe, save_recipe
from qdoctor.policy.search import FixConfig, search
from qdoctor.quant import LayerScheme, QuantLinear, get_scheme, restore
from qdoctor.transforms.smoothing import SmoothingStep

CAL = CalibrationConfig(n_samples=4, seqlen=64, sample_rows=32, holdout_fraction=0.2)


def test_recipe_yaml_round_trip_and_reapply(tmp_path):
    scheme = get_scheme("w8a8-channel-tensor-static").with_overrides(
        {"model.layers.1.mlp.down_proj": LayerScheme(keep="bf16")}, name="plan")
    r = Recipe(scheme=scheme, smoothing=[SmoothingStep("smoothquant", 0.8)], calibration=CAL, model="tiny")
    p = tmp_path / "plan.yaml"
    save_recipe(r, str(p))
    again = load_recipe(str(p))
    assert again.to_dict() == r.to_dict()
    tok = tiny_tokenizer()
    ids = torch.randint(3, 500, (2, 16))
    outs = []
    for rec in (r, again):
        m = tiny_model("llama")
        rec.apply(m, tok, progress=False)
        assert isinstance(m.model.layers[0].mlp.down_proj, QuantLinear)
        assert m.model.layers[1].mlp.down_proj.scheme.keep == "bf16"
        with torch.no_grad():
            outs.append(m(ids).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)  # same seeded calibration → same model


def test_recipe_errors(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("scheme: {default: {keep: bf16}}\nqdoctor_recipe: 7\n")
    with pytest.raises(QDoctorError, match="version"):
        load_recipe(str(bad))
    bad.write_text("scheme: {default: {keep: bf16}}\nsmoothing: [{method: magic}]\n")
    with pytest.raises(QDoctorError, match="smoothing method"):
        load_recipe(str(bad))
    with pytest.raises(QDoctorError, match="no such"):
        load_recipe(str(tmp_path / "none.yaml"))


def test_search_reports_budget_honestly():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = FixConfig(target="w8a8-tensor-static", budget_pct=0.0, eval_windows=2, eval_seqlen=64,
                    max_layer_fraction=0.15, spike_min_ratio=1.0, calibration=CAL)
    r = search(model, tok, cfg, progress=False)
    assert r.trials[0].label == "naive" and r.naive.ppl > r.fp_ppl
    assert r.met == (r.best.ppl <= r.fp_ppl)
    if not r.met:  # a miss shows the best plan found
        assert r.best.ppl == min(t.ppl for t in r.trials)
    assert r.best.kept + r.best.per_group <= int(0.15 * 14)
    # the model is left exactly as it was (full precision, unsmoothed)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    d = r.to_dict()
    assert d["fp_ppl"] == r.fp_ppl and d["planned_ppl"] == r.best.ppl and "trials" in d


def test_fix_config_validation():
    with pytest.raises(QDoctorError):
        FixConfig(keep="int4")
    with pytest.raises(QDoctorError):
        FixConfig(calibration=CalibrationConfig(holdout_fraction=0.0))
