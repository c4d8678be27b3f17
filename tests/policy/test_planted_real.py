"""Issue 5 on the real SmolLM2 with Llama-3-70B-like planted weight outliers (slow).

Measured here (1 WikiText-2 test window of 2048, w8a8-channel-token): unplanted 15.64;
planted 285; mixed granularity g=96 28.1, g=32 15.83, g=16 15.78; bi-smoothing 15.75.
The residual gap of mixed granularity is on the activation side: the planted input channels
are divided by c ≈ 50 and vanish under per-token INT8, which per-group weights cannot undo.
"""

import copy

import pytest
import torch

from qdoctor.calib.collect import CalibrationConfig
from qdoctor.eval.perplexity import perplexity
from qdoctor.policy.evidence import cap, evidence_from_scan, rank_weight_outliers
from qdoctor.scan import ScanConfig
from qdoctor.scan.run import scan_with_stats
from qdoctor.policy.search import group_scheme
from qdoctor.quant import get_scheme, quantize, restore
from qdoctor.transforms.plant import plant_weight_outliers
from qdoctor.transforms.smoothing import SmoothingStep, apply_smoothing

pytestmark = pytest.mark.slow
W8A8 = get_scheme("w8a8-channel-token")


def _q_ppl(model, tok, overrides=None):
    quantize(model, W8A8, overrides=overrides, progress=False)
    try:
        return perplexity(model, tok, limit=1, progress=False).ppl
    finally:
        restore(model)


def test_planted_outliers_found_and_treated(smollm2):
    base_model, tok = smollm2
    model = copy.deepcopy(base_model)
    unplanted = _q_ppl(model, tok)
    ids = tok("The river flows into the sea near the old town.", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
    res = plant_weight_outliers(model, blocks=(0, 1), projections=("q", "k", "v"), dims=3, magnitude=100.0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-3, atol=1e-3)  # function preserved
    for n in res.layers:
        assert float(model.get_submodule(n).weight.detach().abs().max()) >= 100.0 - 1e-3

    planted = _q_ppl(model, tok)
    assert planted > 2 * unplanted  # plain per-channel W8A8 degrades clearly

    report, stats = scan_with_stats(model, tok, ScanConfig(
        calibration=CalibrationConfig(n_samples=8, seqlen=256, sample_rows=256), progress=False))
    ev = evidence_from_scan(report)
    chosen = cap(rank_weight_outliers(ev, 0.01), 210, 0.03)
    assert set(chosen) == set(res.layers)  # precision and recall 1.0

    groups = {n: ev[n].needed_group_size(0.01) for n in chosen}
    mixed = _q_ppl(model, tok, {n: group_scheme(W8A8, g) for n, g in groups.items()})
    assert mixed < unplanted * 1.02

    rep = apply_smoothing(model, stats, SmoothingStep("bismooth-max", 0.5, tuple(chosen)))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-3, atol=1e-3)
    assert max(rep.weight_absmax_after[n] for n in chosen) < 5.0
    bis = _q_ppl(model, tok)
    assert bis < unplanted * 1.015
