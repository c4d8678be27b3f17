"""Export with the plan applied block by block (block-streamed or in memory) writes the checkpoint
of the model quantized first."""

import copy
import json

import pytest
import torch

import qdoctor
from export.ct_reference import read_tensors
from export.test_checkpoint import MIXED
from qdoctor.errors import QDoctorError
from qdoctor.export import export_checkpoint
from qdoctor.models.lazy import load_lazy
from qdoctor.policy.recipe import Recipe
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
    report = export_checkpoint(lazy, tok, tmp_path / "stream", recipe=Recipe(scheme=MIXED, smoothing=steps),
                               stats=lazy_stats, max_shard_size=None, progress=False)
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


def test_recipe_export_in_memory_equals_quantize_then_export(tiny_llama_dir, tmp_path):
    """A model in memory exported with a recipe (blocks treated as written, then put back) gives
    the checkpoint of the model quantized first, and is left as it was."""
    model, tok = qdoctor.load(str(tiny_llama_dir), dtype="fp32", device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = qdoctor.calibrate(model, tok, qdoctor.CalibrationConfig(n_samples=4, seqlen=64))
    recipe = Recipe(scheme=MIXED, smoothing=[SmoothingStep("smoothquant", 0.5)])
    export_checkpoint(model, tok, tmp_path / "recipe", recipe=recipe, stats=stats, progress=False)
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    recipe.apply(model, tok, stats=stats, progress=False)
    export_checkpoint(model, tok, tmp_path / "quantized", progress=False)
    a, b = read_tensors(tmp_path / "recipe"), read_tensors(tmp_path / "quantized")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_quantized_lm_head_is_exported_block_streamed_too(tiny_llama_dir, tmp_path):
    """A scheme that also quantizes the LM head: the head is treated outside the block loop and
    written as the whole-model export writes it."""
    head_too = Scheme.from_dict({"name": "all", "default": {"weights": {"dtype": "int8", "granularity": "channel"}},
                                 "ignore": []})
    model, tok = qdoctor.load(str(tiny_llama_dir), dtype="fp32", device="cpu")
    qdoctor.quantize(model, head_too, progress=False)
    export_checkpoint(model, tok, tmp_path / "whole", progress=False)
    lazy = load_lazy(tiny_llama_dir, dtype=torch.float32, device="cpu")
    export_checkpoint(lazy, tok, tmp_path / "stream", recipe=Recipe(scheme=head_too), progress=False)
    a, b = read_tensors(tmp_path / "whole"), read_tensors(tmp_path / "stream")
    assert "lm_head.weight_scale" in a and sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_streamed_export_refusals(tiny_llama_dir, tmp_path):
    lazy = load_lazy(tiny_llama_dir, dtype=torch.float32, device="cpu")
    with pytest.raises(QDoctorError, match="not quantized"):
        export_checkpoint(lazy, None, tmp_path / "a")
    with pytest.raises(QDoctorError, match="calibrate first"):
        export_checkpoint(lazy, None, tmp_path / "c", recipe=Recipe.of(qdoctor.quant.get_scheme(
            "w8a8-channel-tensor-static")))
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
