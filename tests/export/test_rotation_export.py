"""Export of a rotated plan: R1/R2 are different weights, R4 a compressed-tensors transform_config.

transformers 5.24 does not read ``transform_config`` (its compressed-tensors quantizer never calls
``apply_transform_config``): a checkpoint with an online R4 loads, but runs without the Hadamard.
Applying compressed-tensors' own ``apply_transform_config`` with the config the checkpoint carries
gives qdoctor's simulated logits — the config describes the matrix qdoctor used."""

import json

import pytest
import torch

import qdoctor
from export.ct_reference import loader_semantics, read_tensors
from helpers import save_tiny
from qdoctor.export import export_checkpoint
from qdoctor.models.lazy import load_lazy
from qdoctor.policy.recipe import Recipe
from qdoctor.quant.spec import get_scheme
from qdoctor.transforms.hadamard import sylvester
from qdoctor.transforms.rotation import RotationStep


@pytest.fixture(scope="module")
def rotated_export(tmp_path_factory):
    src = save_tiny("gemma", tmp_path_factory.mktemp("m") / "gemma")  # tied embeddings, (1 + w) norms
    model, tok = qdoctor.load(str(src), dtype="fp32", device="cpu")
    recipe = Recipe(scheme=get_scheme("w8a8-channel-token"), rotation=RotationStep(r1=True, r2=True, r4=True))
    out = tmp_path_factory.mktemp("o") / "ckpt"
    report = export_checkpoint(model, tok, out, recipe=recipe, progress=False)
    return src, model, tok, recipe, out, report


def test_config_carries_an_online_hadamard_and_untied_head(rotated_export):
    from compressed_tensors.transform import TransformConfig

    _, model, _, _, out, report = rotated_export
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and any("untied" in w for w in report.warnings)
    tc = TransformConfig.model_validate(cfg["quantization_config"]["transform_config"])
    (name, scheme), = tc.config_groups.items()
    assert scheme.type == "hadamard" and scheme.head_dim == 128  # intermediate 128: one Sylvester block
    (args,), n = scheme.apply, len(model.model.layers)
    assert args.location == "input" and args.targets == [f"model.layers.{i}.mlp.down_proj" for i in range(n)]
    t = read_tensors(out)
    assert torch.equal(t[f"model.layers.0.mlp.down_proj.{name}_input.weight"], sylvester(128).float())
    assert not torch.equal(t["lm_head.weight"], t["model.embed_tokens.weight"])
    # the model exported from is as it was (tied, unrotated)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings


def test_loaded_with_the_transform_config_gives_qdoctors_logits(rotated_export):
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from transformers import AutoModelForCausalLM

    _, model, tok, recipe, out, _ = rotated_export
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    ids[:, 0] = tok.bos_token_id
    loaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        plain = loaded(ids).logits
        cfg = json.loads((out / "config.json").read_text())["quantization_config"]["transform_config"]
        apply_transform_config(loaded, TransformConfig.model_validate(cfg))
        got = loaded(ids).logits
        with recipe.applied(model, tok), loader_semantics(model):
            sim = model(ids).logits
        fp = model(ids).logits
    assert (got - sim).abs().max().item() <= 1e-4 * sim.abs().max().item()
    # without the online Hadamard the checkpoint is another function (transformers alone runs that)
    assert (plain - sim).abs().max().item() > 100 * max((got - sim).abs().max().item(), 1e-6)
    assert (got - fp).abs().max().item() < 0.1 * fp.abs().max().item()  # and close to full precision


def test_streamed_export_writes_the_same_tensors(rotated_export, tmp_path):
    src, _, tok, recipe, out, _ = rotated_export
    lazy = load_lazy(src, dtype=torch.float32, device="cpu")
    export_checkpoint(lazy, tok, tmp_path / "s", recipe=recipe, progress=False)
    a, b = read_tensors(out), read_tensors(tmp_path / "s")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((tmp_path / "s" / "config.json").read_text())["quantization_config"] == \
        json.loads((out / "config.json").read_text())["quantization_config"]


def test_verification_applies_the_online_hadamard_on_both_sides(rotated_export):
    """Export verification of an R4 plan: the loader-rule simulation applies the layer's online
    Hadamard and the reloaded checkpoint gets its transform_config; without either, both sides run
    down_proj on unrotated inputs and agree on a broken model (SmolLM2 (b) plan: PPL 3e12 on both)."""
    from qdoctor.eval.perplexity import token_windows
    from qdoctor.calib.text import text_source
    from qdoctor.export.verify import VerifySpec, loader_rounding, verify_checkpoint
    from qdoctor.quant.linear import clear_input_transforms
    from qdoctor.models.registry import bos_token_id

    _, model, tok, recipe, out, _ = rotated_export
    windows = token_windows(tok, text_source("wikitext2:test"), 64, bos_token_id(model, tok))[:2]
    v = verify_checkpoint(out, model, tok, VerifySpec(windows=windows, text="wikitext2:test"), recipe=recipe)
    assert abs(v.gap_pct) <= 0.3, v.line()
    ids = windows[:1, :24]
    with torch.no_grad(), recipe.applied(model, tok):
        own = model(ids).logits
        with loader_rounding():
            rule = model(ids).logits
        clear_input_transforms(model)
        with loader_rounding():
            unrotated = model(ids).logits
    # the loaders' rule differs from qdoctor's by rounding only; dropping the Hadamard is another function
    assert (rule - own).abs().max() < 0.1 * (unrotated - own).abs().max()
