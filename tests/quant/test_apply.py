import pytest
import torch

from helpers import tiny_model
from qdoctor.calib.collect import collect_linear_stats, CalibrationStats
from qdoctor.errors import QDoctorError
from qdoctor.models.registry import block_linear_names
from qdoctor.quant import QuantLinear, quantize, restore


def test_quantize_every_block_linear_not_lm_head_and_restore():
    model = tiny_model("llama")
    ids = torch.randint(3, 500, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    res = quantize(model, "w8a8-channel-token", overrides={"model.layers.1.mlp.down_proj": {"keep": "bf16"}},
                   progress=False)
    names = block_linear_names(model)
    assert sorted(res.layers) == sorted(names)
    assert res.ignored == ["lm_head"]
    assert not isinstance(model.lm_head, QuantLinear)
    assert res.layers["model.layers.1.mlp.down_proj"].keep == "bf16"
    with torch.no_grad():
        q = model(ids).logits
    assert not torch.equal(q, ref)
    rel = float((q - ref).norm() / ref.norm())
    assert rel < 0.05, rel
    with pytest.raises(QDoctorError, match="already quantized"):
        quantize(model, "w8a8-channel-token")
    assert restore(model) == len(names)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_static_scheme_needs_calibration_and_uses_it():
    model = tiny_model("llama")
    with pytest.raises(QDoctorError, match="calibrate"):
        quantize(model, "w8a8-channel-tensor-static", progress=False)
    restore(model)
    ids = torch.randint(3, 500, (4, 32))
    names = block_linear_names(model)
    stats = CalibrationStats(layers=collect_linear_stats(model, ids, names), input_ids=ids)
    quantize(model, "w8a8-channel-tensor-static", calibration=stats, progress=False)
    q = model.get_submodule("model.layers.0.mlp.down_proj")
    assert float(q.input_scale) == pytest.approx(stats["model.layers.0.mlp.down_proj"].tensor_absmax / 127)
