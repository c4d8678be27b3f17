"""``qdoctor fix --start-from RECIPE``: the recipe is the search's naive plan, measured on the held-out
windows, and its loss is attributed to the layers the scan's evidence blames under its scheme."""

import json

import pytest

from qdoctor.cli import main
from qdoctor.models.registry import arch_for_model_type
from qdoctor.policy.evidence import LayerEvidence
from qdoctor.policy.recipe import Recipe, read_recipe
from qdoctor.policy.search import Trial
from qdoctor.policy.start import diagnose

from .test_fix_cli import SMALL

STATIC_LC = """
quant_stage:
  quant_modifiers:
    SmoothQuantModifier:
      smoothing_strength: 0.5
    QuantizationModifier:
      ignore: [lm_head]
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 8, type: int, symmetric: true, strategy: tensor}
          input_activations: {num_bits: 8, type: int, symmetric: true, strategy: tensor, dynamic: false,
                              observer: static_minmax}
"""


def test_start_from_an_lc_recipe_is_the_naive_plan(tiny_llama_dir, tmp_path, capsys):
    import qdoctor
    from qdoctor.calib.collect import CalibrationConfig
    from qdoctor.models.registry import bos_token_id
    from qdoctor.policy.search import FixConfig, heldout_windows

    lc = tmp_path / "lc.yaml"
    lc.write_text(STATIC_LC)
    js = tmp_path / "fix.json"
    code = main(["fix", "--model", str(tiny_llama_dir), "--start-from", str(lc), "--budget", "1000%", *SMALL,
                 "--json", str(js)])
    assert code == 0
    report = json.loads(js.read_text())
    err = capsys.readouterr()
    assert f"{lc}: note:" in err.err and "why" in err.out
    start = report["start_from"]
    assert start["path"] == str(lc) and start["unit"] == "%"
    assert report["trials"][0]["label"] == "naive" and report["naive_delta_pct"] == pytest.approx(start["delta"])
    # a second way to the same number: the recipe read from the file, on the fix's calibration and held-out text
    recipe, _ = read_recipe(str(lc))
    cal = CalibrationConfig(n_samples=4, seqlen=64, sample_rows=32, holdout_fraction=0.2)
    recipe.calibration = cal
    model, tok = qdoctor.load(str(tiny_llama_dir))
    cfg = FixConfig(eval_windows=1, eval_seqlen=64, calibration=cal)
    windows = heldout_windows(tok, cfg, bos_token_id(model, tok))
    assert recipe.perplexity(model, tok, windows)[0].ppl == pytest.approx(report["naive_ppl"], rel=1e-5)
    assert report["recipe"]["smoothing"][0]["alpha"] == 0.5  # the start's smoothing carried into the plan


def test_start_from_refuses_target(tmp_path, capsys):
    lc = tmp_path / "lc.yaml"
    lc.write_text(STATIC_LC)
    assert main(["fix", "--model", "/nonexistent", "--start-from", str(lc), "--target", "w8a8-token"]) == 2
    assert "--target is replaced by --start-from" in capsys.readouterr().err


def evidence(name, spike=1.0, channel=0.001, groups=None):
    return LayerEvidence(name=name, spike_ratio=spike, act_absmax=1.0, weight_absmax=1.0, out_w_channel=channel,
                         out_w_group=min((groups or {128: channel}).values()), group_size=128,
                         group_errors=groups or {})


def test_diagnosis_reads_the_evidence_under_the_recipe_scheme():
    """Weight errors of the granularity the recipe uses; spikes only under a per-tensor activation scale;
    layers the recipe does not quantize are not blamed."""
    from transformers import LlamaConfig

    ev = {n.name: n for n in [
        evidence("model.layers.0.self_attn.q_proj", channel=0.05),                     # outlier, per-channel
        evidence("model.layers.0.mlp.down_proj", spike=500.0),                         # spike, static tensor
        evidence("model.layers.1.mlp.down_proj", spike=500.0, channel=0.05),            # ignored by the recipe
        evidence("model.layers.0.self_attn.o_proj", channel=0.05, groups={128: 0.002}),  # per-group: fine
        evidence("model.layers.0.mlp.up_proj", spike=2.0, channel=0.002),              # clean
    ]}
    recipe = Recipe.from_dict({"scheme": {
        "default": {"weights": {"dtype": "int8", "granularity": "channel"},
                    "activations": {"dtype": "int8", "granularity": "tensor"}},
        "overrides": {"*o_proj": {"weights": {"dtype": "int8", "granularity": "group:128"},
                                  "activations": {"dtype": "int8", "granularity": "token", "dynamic": True}}},
        "ignore": ["lm_head", "model.layers.1.*"]},
        "smoothing": [{"method": "smoothquant", "alpha": 0.5, "layers": ["*q_proj"]}]})
    trial = Trial("naive", 12.0, 20.0, 0, 0, 1.0)
    d = diagnose(recipe, ev, trial, "ppl", weight_threshold=0.01, spike_min=50.0,
                 arch=arch_for_model_type("llama"), config=LlamaConfig())
    got = {x.name: x for x in d.layers}
    assert list(got) == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]  # weight first
    q, down = got["model.layers.0.self_attn.q_proj"], got["model.layers.0.mlp.down_proj"]
    assert q.weight_error == 0.05 and "5.00%" in q.reasons[0] and q.smoothed is True
    assert "spike ratio 500" in down.reasons[0] and down.smoothed is False
    assert d.delta == 20.0 and d.unit == "%"
