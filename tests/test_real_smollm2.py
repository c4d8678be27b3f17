"""The real SmolLM2-135M-Instruct (4-bit GGUF dequantized to fp32), on real WikiText-2."""

import pytest
import torch

import qdoctor
from qdoctor.calib.collect import CalibrationConfig

pytestmark = pytest.mark.slow


def test_generates_sensibly(smollm2):
    model, tok = smollm2
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_fp_and_w8a8_perplexity_on_two_windows(smollm2):
    """FP32 PPL on the first 2 WikiText-2 test windows × 2048: measured 14.5–15.5 here; the
    stated range is 10–20. Per-token W8A8 stays within 6%; per-tensor static breaks (>50%)."""
    model, tok = smollm2
    results, _ = qdoctor.compare_schemes(
        model, tok, ["w8a8-channel-token", "w8a8-channel-tensor-static"], seqlen=2048, limit=2,
        calib_config=CalibrationConfig(n_samples=8, seqlen=512), progress=False)
    fp, tok_dyn, static = (r.ppl.ppl for r in results)
    assert 10.0 < fp < 20.0
    assert fp < tok_dyn < fp * 1.06
    assert static > fp * 1.5
    assert not any(isinstance(m, qdoctor.quant.QuantLinear) for m in model.modules())  # restored


def test_down_proj_spikes_are_real(smollm2):
    model, tok = smollm2
    stats = qdoctor.calibrate(model, tok, CalibrationConfig(n_samples=4, seqlen=256),
                              layer_names=[f"model.layers.{i}.mlp.down_proj" for i in (5, 11)])
    assert stats["model.layers.11.mlp.down_proj"].tensor_absmax > 500
    assert stats["model.layers.5.mlp.down_proj"].tensor_absmax < 100
