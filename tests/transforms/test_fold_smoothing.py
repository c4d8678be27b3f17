"""Every fold and smoothing transform preserves the full-precision function."""

import pytest
import torch

from helpers import FAMILIES, tiny_model
from qdoctor.calib.collect import CalibrationStats, collect_linear_stats
from qdoctor.errors import QDoctorError
from qdoctor.models.registry import arch_for, block_linear_names, get_blocks
from qdoctor.transforms.fold import fold_scales
from qdoctor.transforms.smoothing import (
    SmoothingStep,
    apply_smoothing,
    bismooth_scales,
    smoothquant_scales,
)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES + ["llama-mha"])
def test_fold_every_pair_preserves_logits(family):
    if family == "llama-mha":
        from transformers import AutoModelForCausalLM

        from helpers import tiny_config

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config("llama-mha")).eval()
    else:
        model = tiny_model(family)
    ids = torch.randint(3, 500, (2, 17))
    ref = _logits(model, ids)
    arch = arch_for(model)
    g = torch.Generator().manual_seed(1)
    pairs = arch.pairs_for(model.config)
    if family == "llama-mha":
        assert any(p.producer == "self_attn.v_proj" for p in pairs)
    for block in get_blocks(model, arch):
        for pair in pairs:
            k = block.get_submodule(pair.consumers[0]).in_features
            fold_scales(block, arch, pair, torch.rand(k, generator=g, dtype=torch.float64) * 4 + 0.1)
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-4, atol=1e-4)


def test_fold_rejects_bad_scales():
    model = tiny_model("llama")
    arch = arch_for(model)
    block = get_blocks(model, arch)[0]
    with pytest.raises(QDoctorError, match="positive"):
        fold_scales(block, arch, arch.pairs[0], torch.zeros(64))


def test_scale_formulas_against_per_channel_loop():
    a = torch.tensor([4.0, 0.5, 0.0, 9.0])
    w = torch.tensor([1.0, 2.0, 3.0, 0.0])
    sq = smoothquant_scales(a, w, 0.8)
    bi = bismooth_scales(a, w, 0.5)
    for j in range(4):
        if a[j] > 0 and w[j] > 0:
            assert float(sq[j]) == pytest.approx(float(a[j]) ** 0.8 / float(w[j]) ** 0.2)
            assert float(bi[j]) == pytest.approx((float(a[j]) / float(w[j])) ** 0.5)
        else:
            assert float(sq[j]) == 1.0 and float(bi[j]) == 1.0


@pytest.mark.parametrize("method,alpha", [("smoothquant", 0.8), ("bismooth-max", 0.5), ("bismooth-median", 0.5)])
@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen2"])
def test_smoothing_preserves_logits_and_updates_stats_exactly(method, alpha, family):
    model = tiny_model(family)
    ids = torch.randint(3, 500, (4, 24))
    ref = _logits(model, ids)
    names = block_linear_names(model)
    stats = CalibrationStats(collect_linear_stats(model, ids, names, sample_rows=64), ids)
    report = apply_smoothing(model, stats, SmoothingStep(method, alpha))
    assert report.pairs == 2 * len(arch_for(model).pairs_for(model.config))
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-4, atol=1e-4)
    # second derivation: recalibrating the smoothed model gives the rescaled statistics
    fresh = collect_linear_stats(model, ids, names)
    for n in names:
        torch.testing.assert_close(stats[n].channel_absmax, fresh[n].channel_absmax, rtol=1e-4, atol=1e-6)
    with pytest.raises(QDoctorError, match="stale"):
        stats[names[0]].token_absmax


def test_bismoothing_flattens_planted_outliers():
    from qdoctor.transforms.plant import plant_weight_outliers

    model = tiny_model("llama")
    ids = torch.randint(3, 500, (4, 24))
    res = plant_weight_outliers(model, blocks=(0,), dims=[3, 7], magnitude=100.0)
    q = model.model.layers[0].self_attn.q_proj.weight.detach()
    assert float(q[:, [3, 7]].abs().max()) >= 100.0 - 1e-3
    names = block_linear_names(model)
    stats = CalibrationStats(collect_linear_stats(model, ids, names), ids)
    rep = apply_smoothing(model, stats, SmoothingStep("bismooth-max", 0.5, tuple(res.layers)))
    for n in res.layers:
        assert rep.weight_absmax_before[n] >= 100.0 - 1e-3
        assert rep.weight_absmax_after[n] < 10.0
