"""Block-streamed export writes the checkpoint that the whole-model export writes."""

import copy
import json

import pytest
import torch

import qdoctor
from export.ct_reference import read_tensors
from export.test_checkpoint import MIXED
from qdoctor.errors import QDoctorError
from qdoctor.export import export_checkpoint, export_streamed
from qdoctor.models.lazy import load_lazy
from qdoctor.quant.spec import Scheme
from qdoctor.transforms.smoothing import SmoothingStep, apply_smoothing

pytestmark = pytest.mark.filterwarnings("ignore:Using GROUP strategy for both weights")


def _checkpoint(path):
    cfg = json.loads((path / "config.json").read_text())
    index = json.loads((path / "model.safetensors.index.json").read_text()) \
        if (path / "model.safetensors.index.json").exists() else None
    return read_tensors(path), cfg, index


@pytest.mark.parametrize("smooth", [False, True])
def test_streamed_export_equals_whole_model_export(tiny_llama_dir, tmp_path, smooth):
    """Every tensor bit for bit, and the same quantization_config, for the scheme that holds
    every layer kind (per-group, static, FP8, weight-only, kept fp16/bf16), with and without a
    SmoothQuant step in front; one shard per block plus one for the rest."""
    model, tok = qdoctor.load(str(tiny_llama_dir), dtype="fp32", device="cpu")
    stats = qdoctor.calibrate(model, tok, qdoctor.CalibrationConfig(n_samples=4, seqlen=64))
    steps = [SmoothingStep("smoothquant", 0.5)] if smooth else []
    lazy_stats = copy.deepcopy(stats)
    for step in steps:
        apply_smoothing(model, stats, step, scheme=MIXED)
    qdoctor.quantize(model, MIXED, calibration=stats, progress=False)
    export_checkpoint(model, tok, tmp_path / "whole", progress=False)

    lazy = load_lazy(tiny_llama_dir, dtype=torch.float32, device="cpu")
    report = export_streamed(lazy, tok, tmp_path / "stream", MIXED, lazy_stats, steps, progress=False)
    whole_t, whole_cfg, _ = _checkpoint(tmp_path / "whole")
    stream_t, stream_cfg, index = _checkpoint(tmp_path / "stream")
    assert sorted(stream_t) == sorted(whole_t)
    for k in whole_t:
        assert stream_t[k].dtype == whole_t[k].dtype and torch.equal(stream_t[k], whole_t[k]), k
    assert stream_cfg["quantization_config"] == whole_cfg["quantization_config"]
    assert stream_cfg["dtype"] == whole_cfg["dtype"]
    n_blocks = lazy.config.num_hidden_layers
    assert len(set(index["weight_map"].values())) == n_blocks + 1
    assert set(index["weight_map"]) == set(stream_t)
    assert report.weights_bytes > 0 and (tmp_path / "stream" / "README.md").exists()
    # every block was read once and put back
    assert lazy.qdoctor_lazy.loads == n_blocks
    assert all(p.is_meta for b in lazy.model.layers for p in b.parameters())


def test_streamed_export_refusals(tiny_llama_dir, tmp_path):
    model, tok = qdoctor.load(str(tiny_llama_dir), dtype="fp32", device="cpu")
    with pytest.raises(QDoctorError, match="block-streamed model"):
        export_streamed(model, tok, tmp_path / "a", "w8a8-channel-token")
    lazy = load_lazy(tiny_llama_dir, dtype=torch.float32, device="cpu")
    head_too = Scheme.from_dict({"name": "all", "default": {"weights": {"dtype": "int8", "granularity": "channel"}},
                                 "ignore": []})
    with pytest.raises(QDoctorError, match="lm_head"):
        export_streamed(lazy, tok, tmp_path / "b", head_too)
    with pytest.raises(QDoctorError, match="calibrate first"):
        export_streamed(lazy, tok, tmp_path / "c", "w8a8-channel-tensor-static")
    assert not any(tmp_path.iterdir())  # nothing written, not even a staging directory
    assert lazy.qdoctor_lazy.loads == 0


def test_export_cli_stream_matches_whole_model(tiny_llama_dir, tmp_path, capsys):
    """``qdoctor export --stream`` (static scales: calibration streamed too) writes the tensors
    of the plain export, and measures the treated model's perplexity without holding it."""
    from qdoctor.cli import main

    out = {}
    for mode in ("whole", "stream"):
        args = ["export", "--model", str(tiny_llama_dir), "--device", "cpu", "--dtype", "fp32",
                "--scheme", "w8a8-channel-tensor-static", "--calib-samples", "4", "--calib-seqlen", "64",
                "--ppl-windows", "2", "--ppl-seqlen", "64", "--out", str(tmp_path / mode),
                "--json", str(tmp_path / f"{mode}.json")]
        assert main(args + (["--stream"] if mode == "stream" else [])) == 0
        out[mode] = read_tensors(tmp_path / mode)
    assert sorted(out["stream"]) == sorted(out["whole"])
    for k in out["whole"]:
        assert torch.equal(out["stream"][k], out["whole"][k]), k
    cards = {m: (tmp_path / m / "README.md").read_text() for m in out}
    assert "w8a8-channel-tensor-static" in cards["stream"]
    ppl = {m: json.loads((tmp_path / m / "qdoctor_export.json").read_text())["card"]["ppl"] for m in out}
    for key in ("full_precision", "w8a8-channel-tensor-static"):
        assert ppl["stream"][key] == pytest.approx(ppl["whole"][key], rel=1e-4), key
