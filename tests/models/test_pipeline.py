"""The block pipeline (models.streaming): resident and lazy block sources, transient treatment,
the one refusal for whole-model capabilities, and device OOM as one line."""

import pytest
import torch

import qdoctor.models.streaming as S
from qdoctor.errors import QDoctorError
from qdoctor.models.lazy import load_lazy
from qdoctor.models.registry import get_blocks
from qdoctor.models.streaming import block_source, require_resident, stream_blocks
from qdoctor.quant.apply import quantize
from qdoctor.quant.linear import QuantLinear
from tests.helpers import save_tiny, tiny_model


def _ids(n=2, length=16):
    return torch.randint(3, 500, (n, length), generator=torch.Generator().manual_seed(0))


def test_a_transient_pass_leaves_a_resident_model_as_it_was():
    model = tiny_model("llama").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def treat(i, block, inputs):
        quantize(block, "w8a8-channel-token", progress=False, prefix=f"model.layers.{i}.")
        block.input_layernorm.weight.data.mul_(3.0)  # an in-place change of a weight, as smoothing makes
        seen.append(sum(isinstance(m, QuantLinear) for m in block.modules()))

    stream_blocks(model, _ids(), treat, progress=False, transient=True)
    assert seen == [7, 7]
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_outputs_of_the_pipeline_equal_the_model_forward():
    """A second derivation: the last block's outputs through the pipeline, normed and projected,
    are the logits of ``model(ids)``."""
    from qdoctor.models.lazy import final_logits

    model, ids = tiny_model("llama").eval(), _ids()
    hidden = stream_blocks(model, ids, lambda i, b, x: None, progress=False, final_outputs=True, batch_size=1)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        got = torch.cat([final_logits(model, h) for h in hidden])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_whole_model_capabilities_are_refused_once_for_a_lazy_model(tmp_path):
    save_tiny("llama", tmp_path / "m")
    lazy = load_lazy(tmp_path / "m", dtype=torch.float32, device="cpu")
    assert block_source(lazy).resident is False and block_source(tiny_model("llama")).resident is True
    require_resident(tiny_model("llama"), "anything")  # a model in memory: no refusal
    with pytest.raises(QDoctorError, match="zero-shot scoring needs the whole model in memory: not available "
                                           "with --stream"):
        from qdoctor.eval.zeroshot import LoglikelihoodScorer

        LoglikelihoodScorer(lazy)


def test_device_oom_in_a_block_is_one_line_naming_it(monkeypatch):
    model = tiny_model("llama").eval()
    real = S.BlockInputs.forward
    calls = {"n": 0}

    def forward(self, block):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        return real(self, block)

    monkeypatch.setattr(S.BlockInputs, "forward", forward)
    with pytest.raises(QDoctorError) as e:
        stream_blocks(model, _ids(), lambda i, b, x: None, progress=False, desc="calibrating", final_outputs=True)
    msg = str(e.value)
    assert "decoder block 1 (calibrating" in msg and "--calib-samples" in msg and "\n" not in msg
    assert len(get_blocks(model)) == 2
