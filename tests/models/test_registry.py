"""Every registered family, on a tiny random-weight model of its real transformers config."""

import pytest
import torch
import torch.nn as nn

from helpers import FAMILIES, save_tiny, tiny_config, tiny_model
from qdoctor.errors import QDoctorError
from qdoctor.models.registry import ARCHITECTURES, arch_for, arch_for_model_type, get_blocks


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_names_real_modules(family):
    model = tiny_model(family)
    arch = arch_for(model)
    blocks = get_blocks(model, arch)
    assert len(blocks) == 2
    for block in blocks:
        named = dict(block.named_modules())
        for rel in arch.linears:
            assert isinstance(named[rel], nn.Linear), rel
        # the registry lists every nn.Linear of the block: nothing is silently skipped
        assert {n for n, m in named.items() if isinstance(m, nn.Linear)} == set(arch.linears)
        for pair in arch.pairs_for(model.config):
            assert pair.producer in named
            for c in pair.consumers:
                assert c in named, c
        params = dict(block.named_parameters())
        for rel in arch.unsupported:
            assert rel in params, rel


@pytest.mark.parametrize("family", FAMILIES)
def test_norm_offset_matches_the_norm_module(family):
    """Second derivation of (offset + w): recompute every producer norm by hand."""
    model = tiny_model(family)
    arch = arch_for(model)
    block = get_blocks(model, arch)[0]
    x = torch.randn(3, 5, model.config.hidden_size)
    for pair in arch.pairs_for(model.config):
        if pair.kind != "norm":
            continue
        norm = block.get_submodule(pair.producer)
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        ref = normed * (arch.norm_offset + norm.weight)
        torch.testing.assert_close(norm(x), ref, rtol=1e-5, atol=1e-5)


def test_v_to_o_pair_only_without_gqa():
    gqa = tiny_config("llama")
    mha = tiny_config("llama-mha")
    arch = arch_for_model_type("llama")
    assert "self_attn.v_proj" not in [p.producer for p in arch.pairs_for(gqa)]
    assert "self_attn.v_proj" in [p.producer for p in arch.pairs_for(mha)]


def test_unsupported_architecture_lists_supported():
    with pytest.raises(QDoctorError, match="supported: .*llama"):
        arch_for_model_type("gpt2")
    assert len({mt for a in ARCHITECTURES for mt in a.model_types}) >= 9


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen3"])
def test_load_tiny_safetensors_dir_roundtrip(family, tmp_path):
    import qdoctor

    save_tiny(family, tmp_path)
    model, tok = qdoctor.load(str(tmp_path), device="cpu")
    ref = tiny_model(family)
    ids = tok("The river flows", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)
