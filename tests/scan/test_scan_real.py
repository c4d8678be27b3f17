"""Scan on the real SmolLM2-135M (4-bit GGUF dequantized to fp32): its real activation spikes, no
weight outliers; then the same model with planted Llama-3-70B-like outliers, saved and reloaded."""

import copy

import pytest
import torch

import qdoctor
from qdoctor.calib.collect import CalibrationConfig
from qdoctor.scan import ScanConfig, scan
from qdoctor.testing import plant_weight_outliers, precision_recall, save_model

pytestmark = pytest.mark.slow

CFG = ScanConfig(calibration=CalibrationConfig(n_samples=8, seqlen=256), error_tokens=512, progress=False)
DOWN = "model.layers.{}.mlp.down_proj"


@pytest.fixture(scope="module")
def smollm2_report(smollm2):
    model, tok = smollm2
    return scan(model, tok, CFG)


def test_smollm2_spike_layers_and_no_weight_outliers(smollm2_report):
    r = smollm2_report
    spikes = set(r.summary.activation_spike_layers)
    assert {DOWN.format(11), DOWN.format(28)} <= spikes
    assert all(n.endswith("mlp.down_proj") for n in spikes)  # spikes live in the GLU output only
    assert len(spikes) <= 12  # a few layers of 210, not a broad brush
    assert r.summary.weight_outlier_layers == []
    assert max(f.weight.max_abs for f in r.layers) < 10
    l11 = r.layer(DOWN.format(11))
    assert l11.activation.max_token_max > 1000 and l11.spike_ratio > 500
    assert "0" in l11.activation.spike_positions  # the window's first token (attention sink)
    assert r.layer(DOWN.format(29)).activation.max_token_max > 300
    # Per-token dynamic INT8 handles the spike; per-tensor static wrecks the typical token.
    assert l11.activation.typical_token_errors["tensor_static_int8"] > 0.5
    assert l11.errors["out_a_token_dynamic_int8"] < 0.02
    assert r.summary.lines[0].startswith(f"{len(spikes)} of 210 linear layers concentrate activation spikes")


def test_planted_smollm2_is_found_exactly_and_survives_save_load(smollm2, tmp_path):
    model, tok = smollm2
    planted_model = copy.deepcopy(model)
    res = plant_weight_outliers(planted_model, blocks=(0, 1, 2), projections=("q", "k", "v", "gate", "up"),
                                dims=3, magnitude=100.0, seed=0)
    assert len(res.layers) == 15
    ids = tok("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
        torch.testing.assert_close(planted_model(ids).logits, ref, rtol=1e-3, atol=2e-3)
    out = save_model(planted_model, tok, str(tmp_path / "planted"))
    del planted_model
    loaded, tok2 = qdoctor.load(str(out), dtype="fp32", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref, rtol=1e-3, atol=2e-3)
    r = scan(loaded, tok2, CFG)
    assert precision_recall(r.summary.weight_outlier_layers, res.layers) == (1.0, 1.0)
    for name in res.layers:
        f = r.layer(name)
        assert f.weight.max_abs >= 90 and f.errors["out_w_channel"] > 0.01
    assert {DOWN.format(11), DOWN.format(28)} <= set(r.summary.activation_spike_layers)  # spikes unchanged
