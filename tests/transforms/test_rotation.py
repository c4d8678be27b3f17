"""Hadamard rotations: the matrices, the fast apply, and that every rotation preserves the function."""

import math

import pytest
import torch

from helpers import FAMILIES, tiny_config, tiny_model, tiny_tokenizer
from qdoctor.calib.collect import CalibrationConfig, calibrate
from qdoctor.errors import QDoctorError
from qdoctor.models.registry import arch_for_model_type
from qdoctor.policy.recipe import Recipe
from qdoctor.quant.linear import clear_input_transforms
from qdoctor.quant.spec import get_scheme
from qdoctor.transforms.hadamard import (block_rotation, fwht, hadamard_matrix, paley, rotation_for, small_factor,
                                         sylvester)
from qdoctor.transforms.rotation import R1_REFUSED, R4_REFUSED, RestSnapshot, RotationStep, rotate_model

# the orders SmolLM2 (576, 1536, 64), Gemma-3-270M (640, 256; 2048 is Sylvester) and the tiny configs (64, 128, 16) need,
# and the small Paley orders
ORDERS = [1, 2, 12, 16, 20, 28, 36, 40, 44, 60, 64, 128, 256, 576, 640, 1536]  # 2048: Sylvester, as 256
STEPS = [RotationStep(True, False, False), RotationStep(False, True, False), RotationStep(True, True, False),
         RotationStep(True, True, True)]


@pytest.mark.parametrize("n", ORDERS)
def test_hadamard_matrices_are_hadamard(n):
    h = hadamard_matrix(n)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    gram = h.to(torch.int64) @ h.to(torch.int64).T  # exact integer arithmetic
    assert torch.equal(gram, n * torch.eye(n, dtype=torch.int64))
    r = rotation_for(n).matrix()
    assert torch.allclose(r.T @ r, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_constructions_by_their_definitions():
    # Sylvester by its recursion written out; Paley's small orders exist and non-orders are refused
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    assert torch.equal(sylvester(8), torch.kron(h2, torch.kron(h2, h2)))
    assert small_factor(576) == 36 and small_factor(1536) == 12 and small_factor(640) == 20 and small_factor(2048) == 1
    for m in (12, 20, 28, 36, 44, 60):
        assert torch.equal(paley(m) @ paley(m).T, m * torch.eye(m, dtype=torch.float64))
    for n in (3, 6, 52):  # 52 needs Paley over GF(25), not built here
        with pytest.raises(QDoctorError, match="no Hadamard matrix of order"):
            small_factor(n)


def test_sylvester_is_compressed_tensors_deterministic_hadamard():
    """R4's matrix must be the runtime's own (compressed-tensors' ``hadamard`` type)."""
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

    for b in (16, 512):
        assert torch.equal(sylvester(b), deterministic_hadamard_matrix(b, torch.float64))


@pytest.mark.parametrize("n", [64, 576, 640, 1536])
def test_fast_apply_equals_dense_matmul(n):
    x = torch.randn(5, 3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    for rot in (rotation_for(n), block_rotation(n)):
        r = rot.matrix()
        assert torch.allclose(rot.apply(x), x @ r, atol=1e-10)
        assert torch.allclose(rot.apply(x, transpose=True), x @ r.T, atol=1e-10)
    b = n & -n
    assert torch.allclose(fwht(x[..., :b]), x[..., :b] @ sylvester(b), atol=1e-10)


def _kurtosis(x):
    z = x - x.mean(-1, keepdim=True)
    return float(((z ** 4).mean(-1) / (z ** 2).mean(-1) ** 2).mean())


def test_rotation_spreads_planted_outliers():
    """A few channels 50× larger (the massive-activation pattern): after x R the per-token
    absmax/rms ratio and the kurtosis over channels fall to near a Gaussian's."""
    n = 576
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, n, dtype=torch.float64, generator=g)
    x[:, torch.randperm(n, generator=g)[:4]] *= 50.0
    y = rotation_for(n).apply(x)
    ratio = lambda t: float((t.abs().amax(-1) / t.pow(2).mean(-1).sqrt()).mean())  # noqa: E731
    assert ratio(x) > 10 and ratio(y) < ratio(x) / 3
    assert _kurtosis(x) > 50 and _kurtosis(y) < 5  # a Gaussian's is 3
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))  # a rotation: norms kept


def _refused(family, step):
    fam = arch_for_model_type(tiny_config(family).model_type).family
    return (step.r1 and fam in R1_REFUSED) or (step.r4 and fam in R4_REFUSED)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_rotation_preserves_the_function(family):
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    base = tiny_model(family)
    with torch.no_grad():
        ref = base(ids).logits
    for step in STEPS:
        model = tiny_model(family)
        if _refused(family, step):
            with pytest.raises(QDoctorError, match="not available for"):
                rotate_model(model, step)
            continue
        rotate_model(model, step)
        with torch.no_grad():
            out = model(ids).logits
        rel = float((out - ref).norm() / ref.norm())
        assert rel < 1e-4, (family, step)
        if step.r1:  # the rotation did change the weights (not a no-op)
            assert not torch.allclose(model.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_smollm2_rotated_logits_equal(smollm2):
    model, tok = smollm2
    ids = torch.tensor([tok("The tower is 324 metres tall, about the same height as an 81-storey building.")
                        .input_ids])
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rest = RestSnapshot.of(model)
    with torch.no_grad():
        ref = model(ids).logits
        try:
            rotate_model(model, RotationStep(r1=True, r2=True, r4=True))
            assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied
            out = model(ids).logits
        finally:
            clear_input_transforms(model)
            rest.put_back(model)
            model.load_state_dict(snapshot)
    assert float((out - ref).norm() / ref.norm()) < 1e-4
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings


def test_rotation_step_round_trips_and_refuses_bad_input():
    step = RotationStep(r1=True, r2=False, r4=True)
    assert RotationStep.from_dict(step.to_dict()) == step and step.basis == "hadamard:r1+r4"
    assert RotationStep(False, False, False).basis == ""
    for bad, needle in (({"r3": True}, "unknown key"), ({"r1": "yes"}, "true or false"), ([1], "mapping")):
        with pytest.raises(QDoctorError, match=needle):
            RotationStep.from_dict(bad)
    r = Recipe(scheme=get_scheme("w8a8-channel-token"), rotation=step)
    back = Recipe.from_dict(r.to_dict())
    assert back.rotation == step and back.to_dict() == r.to_dict()
    assert "rotation" not in Recipe(scheme=get_scheme("w8a8-channel-token")).to_dict()  # additive key


CAL = CalibrationConfig(n_samples=4, seqlen=32)


def test_unrotated_statistics_are_recalibrated_in_the_rotated_basis():
    """A rotated plan given an unrotated model's statistics calibrates again, rotated: its
    statistics equal those of a model rotated in place and calibrated plainly."""
    tok = tiny_tokenizer()
    model = tiny_model("llama")
    step = RotationStep(r1=True, r2=True, r4=True)
    recipe = Recipe(scheme=get_scheme("w8a8-tensor-tensor-static"), calibration=CAL, rotation=step)
    plain = calibrate(model, tok, CAL)
    got = recipe.statistics(model, tok, plain)
    assert plain.basis == "" and got.basis == step.basis and got is not plain
    assert recipe.statistics(model, tok, got) is got  # statistics in the plan's basis are used as given
    rotated = tiny_model("llama")
    rotate_model(rotated, step)
    want = calibrate(rotated, tok, CAL)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"):
        assert torch.allclose(got[name].channel_absmax, want[name].channel_absmax, rtol=1e-4, atol=1e-6), name
        assert not torch.allclose(got[name].channel_absmax, plain[name].channel_absmax, rtol=1e-2)
    # and the model it calibrated is as it was
    fresh = tiny_model("llama")
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())


def test_applied_restores_a_tied_model():
    tok = tiny_tokenizer()
    model = tiny_model("gemma")  # (1 + w) norms, tied embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    recipe = Recipe(scheme=get_scheme("w8a8-channel-token"), calibration=CAL, rotation=RotationStep(r4=True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with recipe.applied(model, tok) as applied:
        assert model.lm_head.weight is not model.model.embed_tokens.weight
        assert not model.config.tie_word_embeddings and len(applied.layers) == 14
        down = model.model.layers[0].mlp.down_proj
        assert down.qdoctor_input_transform is not None
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(getattr(m, "qdoctor_input_transform", None) for m in model.modules())


def test_rotated_plan_streamed_equals_resident(tiny_llama_dir):
    from qdoctor.eval.perplexity import token_windows
    from qdoctor.calib.text import wikitext_text
    from qdoctor.models.lazy import load_lazy

    tok = tiny_tokenizer()
    resident = tiny_model("llama")
    lazy = load_lazy(tiny_llama_dir, dtype=torch.float32, device="cpu")
    windows = token_windows(tok, wikitext_text("test")[:20000], 64)[:2]
    recipe = Recipe(scheme=get_scheme("w8a8-tensor-tensor-static"), calibration=CAL, rotation=RotationStep(r4=True))
    naive = Recipe(scheme=recipe.scheme, calibration=CAL)
    a, _ = recipe.perplexity(resident, tok, windows)
    b, _ = recipe.perplexity(lazy, tok, windows)
    c, _ = naive.perplexity(resident, tok, windows)
    assert math.isclose(a.ppl, b.ppl, rel_tol=1e-5)
    assert not math.isclose(a.ppl, c.ppl, rel_tol=1e-6)  # the rotation changed what was quantized
    again, _ = recipe.perplexity(resident, tok, windows)  # nothing left over from the first pass
    assert again.ppl == a.ppl


def test_quantize_cli_reproduces_a_rotated_recipe_whole_and_streamed(tiny_llama_dir, tmp_path):
    from helpers import cli_reports_whole_and_streamed
    from qdoctor.calib.text import text_source
    from qdoctor.eval.perplexity import token_windows
    from qdoctor.policy.recipe import load_recipe, save_recipe

    recipe = Recipe(scheme=get_scheme("w8a8-tensor-tensor-static"), calibration=CAL,
                    rotation=RotationStep(r1=True, r2=True, r4=True))
    path = tmp_path / "rot.yaml"
    save_recipe(recipe, str(path))
    assert load_recipe(str(path)).rotation == recipe.rotation
    whole, streamed = cli_reports_whole_and_streamed(
        tmp_path, ["quantize", "--model", str(tiny_llama_dir), "--recipe", str(path), "--seqlen", "64", "--limit", "1"])
    assert streamed["quantized"]["ppl"] == pytest.approx(whole["quantized"]["ppl"], rel=1e-5)
    tok = tiny_tokenizer()
    want, _ = recipe.perplexity(tiny_model("llama"), tok, token_windows(tok, text_source("wikitext2:test"), 64),
                                limit=1)
    assert whole["quantized"]["ppl"] == pytest.approx(want.ppl, rel=1e-5)
