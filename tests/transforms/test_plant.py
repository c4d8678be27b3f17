"""Planted weight outliers: function-preserving, large where planted, and they survive save → load."""

import json

import pytest
import torch

import qdoctor
from helpers import FAMILIES, tiny_model, tiny_tokenizer
from qdoctor.cli import main
from qdoctor.errors import QDoctorError
from qdoctor.testing import PLANT_METADATA, plant_weight_outliers, precision_recall, save_model

# Mixtral's MLP experts are not nn.Linear: only q/k/v (fed by the input norm) can be planted there.
PROJ = {f: ("q", "k", "v", "gate", "up") for f in FAMILIES} | {"mixtral": ("q", "k", "v")}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_plant_preserves_logits_and_plants_large_weights(family):
    model = tiny_model(family)
    ids = torch.randint(3, 500, (2, 19))
    ref = _logits(model, ids)
    res = plant_weight_outliers(model, blocks=(0, 1), projections=PROJ[family], dims=3, magnitude=100.0, seed=0)
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-4, atol=1e-4)
    assert set(res.dims) == {0, 1} and all(len(d) == 3 for d in res.dims.values())
    assert len(res.layers) == 2 * len(PROJ[family])
    modules = dict(model.named_modules())
    for name in res.layers:
        w = modules[name].weight.detach()
        block = int(name.split(".")[2])
        assert float(w.abs().max()) >= 90.0
        # The outliers sit exactly on the planted input dims, nowhere else.
        col = w.abs().amax(dim=0)
        assert set(col.topk(3).indices.tolist()) == set(res.dims[block])
        assert float(col[[j for j in range(w.shape[1]) if j not in res.dims[block]]].max()) < 1.0
    # Untouched layers (o/down, unplanted blocks) keep small weights.
    for name, m in modules.items():
        if isinstance(m, torch.nn.Linear) and name not in res.layers and name != "lm_head":
            assert float(m.weight.detach().abs().max()) < 1.0


def test_plant_explicit_dims_and_bad_input():
    model = tiny_model("llama")
    res = plant_weight_outliers(model, blocks=(1,), projections=("gate",), dims=[5, 9], magnitude=95.0)
    assert res.dims == {1: [5, 9]}
    assert sorted(res.layers) == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]  # gate's norm feeds up too
    with pytest.raises(QDoctorError, match="out of range"):
        plant_weight_outliers(model, blocks=(7,))
    with pytest.raises(QDoctorError, match="not fed by a norm"):
        plant_weight_outliers(model, projections=("down",))
    with pytest.raises(QDoctorError, match="positive"):
        plant_weight_outliers(model, magnitude=0)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_planted_model_saved_and_reloaded_gives_same_logits(family, tmp_path):
    model = tiny_model(family)
    res = plant_weight_outliers(model, blocks=(0, 1), projections=PROJ[family], dims=2, magnitude=100.0, seed=3)
    ids = torch.randint(3, 500, (2, 15))
    ref = _logits(model, ids)
    out = save_model(model, tiny_tokenizer(), str(tmp_path / "planted"), metadata={"layers": res.layers})
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp dir renamed away
    loaded, tok = qdoctor.load(str(out), dtype="fp32", device="cpu")
    torch.testing.assert_close(_logits(loaded, ids), ref, rtol=1e-5, atol=1e-5)
    assert json.loads((out / PLANT_METADATA).read_text())["layers"] == res.layers
    with pytest.raises(QDoctorError, match="already exists"):
        save_model(model, tok, str(out))


def test_precision_recall():
    assert precision_recall(["a", "b"], ["a", "b"]) == (1.0, 1.0)
    assert precision_recall(["a", "c"], ["a", "b"]) == (0.5, 0.5)
    assert precision_recall([], []) == (1.0, 1.0)
    assert precision_recall([], ["a"]) == (0.0, 0.0)


def test_plant_cli_writes_loadable_dir_atomically(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "planted"
    args = ["plant", "--model", str(tiny_llama_dir), "--out", str(out), "--blocks", "0,1", "--dims", "2",
            "--magnitude", "90"]
    assert main(args) == 0
    meta = json.loads((out / PLANT_METADATA).read_text())
    assert meta["blocks"] == [0, 1] and len(meta["layers"]) == 10 and meta["magnitude"] == 90.0
    original, _ = qdoctor.load(str(tiny_llama_dir), dtype="fp32", device="cpu")
    planted, _ = qdoctor.load(str(out), dtype="fp32", device="cpu")
    ids = torch.randint(3, 500, (1, 12))
    torch.testing.assert_close(_logits(planted, ids), _logits(original, ids), rtol=1e-4, atol=1e-4)
    assert float(planted.model.layers[1].self_attn.k_proj.weight.detach().abs().max()) >= 90.0
    # Refuses an existing directory without --overwrite (one line, exit 2), replaces it with.
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--seed", "1"]) == 0
    assert json.loads((out / PLANT_METADATA).read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["planted"]  # no temporaries left
