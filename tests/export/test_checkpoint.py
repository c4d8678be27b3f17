"""Export of a tiny random-weight llama: what is on disk, and what transformers computes with it."""

import json
import os

import pytest
import torch

import qdoctor
from export.ct_reference import assert_stored_as_qdoctor, loader_semantics, read_tensors, weights_only
from qdoctor.errors import QDoctorError
from qdoctor.export import export_checkpoint
from qdoctor.quant.spec import Scheme

# The mixed plan pairs group-64 weights with group-32 activations on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Using GROUP strategy for both weights")

W = lambda d, g: {"dtype": d, "granularity": g}  # noqa: E731
DYN = lambda d, g="token": {"dtype": d, "granularity": g, "dynamic": True}  # noqa: E731
STAT = lambda d: {"dtype": d, "granularity": "tensor", "dynamic": False}  # noqa: E731

# Every kind of layer the format holds: INT8 per-channel/per-group with dynamic per-token,
# per-tensor and per-group activations, static per-tensor INT8 and FP8, weight-only INT8
# (pack-quantized), FP8 per-channel, kept bf16 and fp16, lm_head untouched.
MIXED = Scheme.from_dict({"name": "mixed", "default": {"weights": W("int8", "channel"), "activations": DYN("int8")},
                          "overrides": {
                              "model.layers.0.self_attn.[qkv]_proj": {"weights": W("int8", "group:32"),
                                                                      "activations": DYN("int8")},
                              "model.layers.0.self_attn.o_proj": {"weights": W("int8", "channel"),
                                                                  "activations": DYN("int8", "tensor")},
                              "model.layers.0.mlp.down_proj": {"weights": W("int8", "group:64"),
                                                               "activations": DYN("int8", "group:32")},
                              "model.layers.0.mlp.[gu][ap]*": {"weights": W("int8", "channel"), "activations": None},
                              "model.layers.1.self_attn.[qkv]_proj": {"weights": W("fp8", "channel"),
                                                                      "activations": DYN("fp8")},
                              "model.layers.1.self_attn.o_proj": {"keep": "fp16"},
                              "model.layers.1.mlp.[gu][ap]*": {"weights": W("int8", "channel"),
                                                               "activations": STAT("int8")},
                              "model.layers.1.mlp.down_proj": {"keep": "bf16"},
                          }})


def quantized_tiny(tiny_llama_dir, scheme=MIXED):
    model, tok = qdoctor.load(str(tiny_llama_dir), dtype="fp32", device="cpu")
    stats = None
    if scheme.needs_calibration:
        stats = qdoctor.calibrate(model, tok, qdoctor.CalibrationConfig(n_samples=4, seqlen=64))
    qdoctor.quantize(model, scheme, calibration=stats, progress=False)
    return model, tok


@pytest.fixture(scope="module")
def exported(tiny_llama_dir, tmp_path_factory):
    model, tok = quantized_tiny(tiny_llama_dir)
    out = tmp_path_factory.mktemp("export") / "ckpt"
    card = {"evidence": {"model.layers.1.mlp.down_proj": "activation spike ratio 812 (made-up test input)"},
            "ppl": {"full_precision": 12.5, "mixed": 13.0, "windows": 2, "seqlen": 64}}
    report = export_checkpoint(model, tok, out, card=card, max_shard_size="100KB", progress=False)
    return model, tok, out, report


@pytest.fixture(scope="module")
def loaded(exported):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(exported[2])


def test_files_config_and_shards(exported):
    _, _, out, report = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "generation_config.json", "tokenizer.json",
            "README.md", "qdoctor_export.json"} <= names
    assert len(list(out.glob("*.safetensors"))) >= 2  # sharded
    assert not list(out.parent.glob(".ckpt.*"))  # staging directory renamed away
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    from compressed_tensors.quantization import QuantizationConfig

    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.format == "mixed-precision" and qc["quantization_status"] == "compressed"
    assert set(qc["ignore"]) == {"model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj", "lm_head"}
    formats = sorted(g["format"] for g in qc["config_groups"].values())
    assert formats == ["float-quantized", "int-quantized", "int-quantized", "int-quantized", "int-quantized",
                       "pack-quantized"]
    assert report.files == {p.name: p.stat().st_size for p in out.iterdir()}
    assert report.total_bytes == sum(report.files.values())
    n = sum(p.numel() for p in exported[0].parameters())
    assert report.fp32_bytes == 4 * n and report.bf16_bytes == 2 * n
    assert report.weights_bytes < report.fp32_bytes


def test_codes_and_scales_on_disk_are_qdoctors_bit_for_bit(exported):
    model, _, out, _ = exported
    t = read_tensors(out)
    assert assert_stored_as_qdoctor(model, t) == 12
    assert t["model.embed_tokens.weight"].dtype == torch.float32


def test_transformers_quantizes_activations_as_compressed_tensors_does(exported, loaded):
    """The loaded model = ŵ + compressed-tensors' activation fake-quantization, exactly."""
    model = exported[0]
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = loaded(ids).logits
        sim = model(ids).logits
        with loader_semantics(model):
            ct = model(ids).logits
        with weights_only(model):
            wo = model(ids).logits
    assert (got - ct).abs().max().item() <= 1e-5
    # Not weight-only: switching activation quantization off moves the logits far more.
    assert (got - wo).abs().max().item() > 100 * max((got - ct).abs().max().item(), 1e-6)
    # qdoctor's own simulation differs only by the int8 dynamic convention (/127 vs /127.5)
    # and the bf16/fp16 rounding of the kept layers' inputs and outputs.
    assert (got - sim).abs().max().item() < 0.05 * got.abs().max().item()


def test_loaded_modules_carry_the_planned_schemes(loaded):
    q = loaded.model.layers[0].self_attn.q_proj
    assert q.quantization_scheme.weights.strategy == "group" and q.quantization_scheme.weights.group_size == 32
    assert loaded.model.layers[1].self_attn.q_proj.quantization_scheme.weights.type == "float"
    assert not hasattr(loaded.model.layers[1].mlp.down_proj, "quantization_scheme")
    assert loaded.model.layers[1].mlp.gate_proj.quantization_scheme.input_activations.dynamic is False


def test_tokenizer_and_generation_config_copied(exported):
    from transformers import AutoTokenizer, GenerationConfig

    _, tok, out, _ = exported
    tok2 = AutoTokenizer.from_pretrained(out)
    text = "The tower is 324 metres tall, about the same height as an 81-storey building."
    assert tok2(text).input_ids == tok(text).input_ids
    assert GenerationConfig.from_pretrained(out).eos_token_id == exported[0].generation_config.eos_token_id


def test_model_card_prints_what_it_was_given(exported):
    _, _, out, report = exported
    card = (out / "README.md").read_text()
    assert "activation spike ratio 812 (made-up test input)" in card
    assert "| mixed | 13.0000 | +4.00% |" in card and "12.5000" in card
    assert "`model.layers.1.mlp.down_proj` | bf16 |" in card and "`model.layers.1.self_attn.o_proj` | fp16 |" in card
    assert "int8 group 32" in card and "fp8 per-channel" in card and "int8 per-tensor static (absmax)" in card
    assert "vLLM" in card and "not per-group" in card  # the per-group INT8 W8A8 group has no vLLM kernel
    assert report.vllm_issues


def test_card_without_measurements_says_so(tiny_llama_dir, tmp_path):
    model, tok = quantized_tiny(tiny_llama_dir, qdoctor.quant.get_scheme("w8a8-channel-token"))
    report = export_checkpoint(model, tok, tmp_path / "c", progress=False)
    card = (tmp_path / "c" / "README.md").read_text()
    assert "No measurements were supplied" in card
    assert "every scheme in this checkpoint has a vLLM kernel" in card and report.vllm_issues == []


def test_dequantize_true_is_weight_only(tiny_llama_dir, tmp_path):
    """transformers' other route, CompressedTensorsConfig(dequantize=True), only dequantizes the
    weights (single-group checkpoints; it applies one group's scheme to every layer)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model, tok = quantized_tiny(tiny_llama_dir, qdoctor.quant.get_scheme("w8a8-channel-token"))
    export_checkpoint(model, tok, tmp_path / "u", progress=False)
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "u", quantization_config=CompressedTensorsConfig(dequantize=True))
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), weights_only(model):
        wo = model(ids).logits
    with torch.no_grad():
        assert (m(ids).logits - wo).abs().max().item() <= 1e-5


def test_bf16_checkpoint_stores_unquantized_tensors_in_bf16(tiny_llama_dir, tmp_path):
    model, tok = quantized_tiny(tiny_llama_dir, qdoctor.quant.get_scheme("w8a8-channel-tensor-static"))
    report = export_checkpoint(model, tok, tmp_path / "b", dtype="bf16", progress=False)
    t = read_tensors(tmp_path / "b")
    assert t["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert t["model.norm.weight"].dtype == torch.bfloat16
    assert t["model.layers.0.mlp.up_proj.weight"].dtype == torch.int8
    assert t["model.layers.0.mlp.up_proj.weight_scale"].dtype == torch.float32
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dtype"] == "bfloat16"
    assert report.checkpoint_dtype == "bf16" and report.weights_bytes < report.bf16_bytes


def test_quantized_tied_lm_head_is_untied(tmp_path):
    from helpers import tiny_config, tiny_tokenizer
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    scheme = qdoctor.quant.get_scheme("w8a8-channel-token")
    scheme = Scheme(scheme.name, scheme.default, ignore=())  # lm_head quantized too
    qdoctor.quantize(model, scheme, progress=False)
    report = export_checkpoint(model, tiny_tokenizer(), tmp_path / "t", progress=False)
    assert any("untied" in w for w in report.warnings)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "t")
    assert loaded.config.tie_word_embeddings is False
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), loader_semantics(model):
        assert (loaded(ids).logits - model(ids).logits).abs().max().item() <= 1e-5


# ---- refusals: one clear error, nothing written -------------------------------------------------------------


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_existing_dir_refused_without_overwrite_then_replaced(tiny_llama_dir, tmp_path):
    model, tok = quantized_tiny(tiny_llama_dir, qdoctor.quant.get_scheme("w8a8-channel-token"))
    out = tmp_path / "o"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(QDoctorError, match="already exists"):
        export_checkpoint(model, tok, out, progress=False)
    assert (out / "config.json").read_text() == "{}"
    export_checkpoint(model, tok, out, overwrite=True, progress=False)
    assert "quantization_config" in json.loads((out / "config.json").read_text())
    assert _leftovers(tmp_path) == []


def test_overwrite_never_replaces_a_non_checkpoint_directory(tiny_llama_dir, tmp_path):
    model, tok = quantized_tiny(tiny_llama_dir, qdoctor.quant.get_scheme("w8a8-channel-token"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("precious")
    with pytest.raises(QDoctorError, match="not a model checkpoint"):
        export_checkpoint(model, tok, tmp_path / "home", overwrite=True, progress=False)
    assert (tmp_path / "home" / "notes.txt").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(QDoctorError, match="not a directory"):
        export_checkpoint(model, tok, tmp_path / "file", overwrite=True, progress=False)


@pytest.mark.parametrize("sub,needle", [("missing/out", "does not exist"), ("afile/out", "is not a directory")])
def test_bad_parent(tiny_llama_dir, tmp_path, sub, needle):
    model, tok = quantized_tiny(tiny_llama_dir, qdoctor.quant.get_scheme("w8a8-channel-token"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(QDoctorError, match=needle):
        export_checkpoint(model, tok, tmp_path / sub, progress=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_parent(tiny_llama_dir, tmp_path):
    model, tok = quantized_tiny(tiny_llama_dir, qdoctor.quant.get_scheme("w8a8-channel-token"))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(QDoctorError, match="permission denied"):
            export_checkpoint(model, tok, ro / "out", progress=False)
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("overrides,dtype,needle", [
    ({"model.layers.1.mlp.down_proj": {"keep": "fp16"}}, "bf16", "kept in fp16 but the checkpoint dtype is bf16"),
    ({"model.layers.1.mlp.down_proj": {"keep": "bf16"}}, "fp16", "kept in bf16 but the checkpoint dtype is fp16"),
    ({"model.layers.*": {"keep": "bf16"}}, None, "no layer is quantized"),
])
def test_unsupported_plan_writes_nothing(tiny_llama_dir, tmp_path, overrides, dtype, needle):
    model, tok = qdoctor.load(str(tiny_llama_dir), dtype="fp32", device="cpu")
    qdoctor.quantize(model, "w8a8-channel-token", overrides=overrides, progress=False)
    with pytest.raises(QDoctorError, match=needle):
        export_checkpoint(model, tok, tmp_path / "x", dtype=dtype, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_require_vllm_refuses_per_group_w8a8(tiny_llama_dir, tmp_path):
    model, tok = qdoctor.load(str(tiny_llama_dir), dtype="fp32", device="cpu")
    qdoctor.quantize(model, "w8a8-channel-token", overrides={"*": {"weights": W("int8", "group:32"),
                                                                   "activations": DYN("int8")}}, progress=False)
    with pytest.raises(QDoctorError, match="vLLM cannot serve this plan"):
        export_checkpoint(model, tok, tmp_path / "v", require_vllm=True, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unquantized_model_refused(tiny_llama_dir, tmp_path):
    model, tok = qdoctor.load(str(tiny_llama_dir), dtype="fp32", device="cpu")
    with pytest.raises(QDoctorError, match="not quantized"):
        export_checkpoint(model, tok, tmp_path / "n", progress=False)


def test_failure_while_writing_leaves_nothing_and_keeps_the_old_checkpoint(tiny_llama_dir, tmp_path, monkeypatch):
    import qdoctor.export.checkpoint as ck

    model, tok = quantized_tiny(tiny_llama_dir, qdoctor.quant.get_scheme("w8a8-channel-token"))
    out = tmp_path / "o"
    export_checkpoint(model, tok, out, progress=False)
    before = {p.name: p.stat().st_size for p in out.iterdir()}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "render_card", boom, raising=False)
    monkeypatch.setattr("qdoctor.export.card.render_card", boom)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(model, tok, out, overwrite=True, progress=False)
    assert {p.name: p.stat().st_size for p in out.iterdir()} == before
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "mixtral"])
def test_every_family_round_trips(family, tmp_path):
    from helpers import save_tiny
    from transformers import AutoModelForCausalLM

    model, tok = qdoctor.load(str(save_tiny(family, tmp_path / "m")), dtype="fp32", device="cpu")
    qdoctor.quantize(model, "w8a8-channel-token", progress=False)
    report = export_checkpoint(model, tok, tmp_path / "o", progress=False)
    qc = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    if family == "mixtral":  # attention only; the router is listed under its checkpoint name
        assert qc["config_groups"]["group_0"]["targets"] == [
            r"re:model\.layers\.\d+\.self_attn\.(?:q_proj|k_proj|v_proj|o_proj)$"]
        assert "model.layers.0.block_sparse_moe.gate" in qc["ignore"]
        assert any("fused MoE experts" in w for w in report.warnings)
        return  # transformers 5.23 cannot load it (see the warning)
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"] and qc["ignore"] == ["lm_head"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    ids = torch.randint(3, 512, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), loader_semantics(model):
        assert (loaded(ids).logits - model(ids).logits).abs().max().item() <= 1e-5


def test_biases_follow_the_checkpoint_dtype(tmp_path):
    from helpers import save_tiny

    model, tok = qdoctor.load(str(save_tiny("qwen2", tmp_path / "m")), dtype="fp32", device="cpu")
    qdoctor.quantize(model, "w8a8-channel-token", overrides={"model.layers.0.self_attn.k_proj": {"keep": "bf16"}},
                     progress=False)
    export_checkpoint(model, tok, tmp_path / "o", dtype="bf16", progress=False)
    t = read_tensors(tmp_path / "o")
    assert t["model.layers.1.self_attn.q_proj.bias"].dtype == torch.bfloat16
    assert t["model.layers.0.self_attn.k_proj.bias"].dtype == torch.bfloat16
    assert torch.equal(t["model.layers.1.self_attn.q_proj.bias"],
                       model.model.layers[1].self_attn.q_proj.bias.detach().to(torch.bfloat16))


def test_card_draws_a_plan_search_as_one_table(tiny_llama_dir):
    """A recipe's search result (what ``qdoctor fix`` records) becomes one table of its numbers, not
    a dump of the dict; the deltas printed are the ones recomputed here from the values."""
    from qdoctor.calib.collect import CalibrationConfig
    from qdoctor.export.card import search_lines
    from qdoctor.policy.search import RESULT_KEYS, FixConfig, search

    model, tok = qdoctor.load(str(tiny_llama_dir), dtype="fp32", device="cpu")
    cfg = FixConfig(target="w8a8-channel-token", budget_pct=50.0, eval_windows=1, eval_seqlen=64, serve="vllm",
                    calibration=CalibrationConfig(n_samples=4, seqlen=64, sample_rows=64, holdout_fraction=0.2))
    m = search(model, tok, cfg, progress=False).recipe.metrics
    assert set(m) <= set(RESULT_KEYS)  # the card knows every key the search records
    text = "\n".join(search_lines(m))
    assert f"| full precision | {m['fp_value']:.3f} | — |" in text
    naive = 100.0 * (m["naive_value"] / m["fp_value"] - 1.0)
    planned = 100.0 * (m["planned_value"] / m["fp_value"] - 1.0)
    assert f"| naive w8a8-channel-token | {m['naive_value']:.3f} | {naive:+.2f}% |" in text
    assert f"| this plan: {m['plan']} | {m['planned_value']:.3f} | {planned:+.2f}% (budget 50.0%: met) |" in text
    assert "1 windows" not in text and "1 × 64 tokens of the last 20% of wikitext2:valid" in text
    assert "vllm serving profile (hopper, tp 1)" in text and "{'" not in text
    assert search_lines({"calibration": "64 × 512 tokens"}) == []  # no search result: the plain table
