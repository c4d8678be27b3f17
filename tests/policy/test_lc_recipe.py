"""llm-compressor recipes → qdoctor recipes, checked field by field against llm-compressor's documented
examples and, for the layer → scheme map, against compressed-tensors' own matching rules."""

import fnmatch
import json
import re
from collections import OrderedDict

import pytest
import torch.nn as nn
import yaml

from qdoctor.errors import QDoctorError
from qdoctor.policy.lc_recipe import from_llm_compressor, is_lc_recipe, regex_to_globs, sample_names
from qdoctor.policy.recipe import Recipe, read_recipe
from qdoctor.quant.spec import LayerScheme, Scheme

# tests/llmcompressor/transformers/compression/recipes/smoothquant_gptq_w8a8.yaml (llm-compressor), the
# recipe of examples/quantization_w8a8_int8/llama3_example.py written out as a file
W8A8_INT8_LLAMA3 = """
quant_stage:
  quant_modifiers:
    SmoothQuantModifier:
      smoothing_strength: 0.8
      mappings:
      - - ['re:.*q_proj', 're:.*k_proj', 're:.*v_proj']
        - re:.*input_layernorm
      - - ['re:.*gate_proj', 're:.*up_proj']
        - re:.*post_attention_layernorm
    GPTQModifier:
      targets: ["Linear"]
      ignore: [lm_head]
      scheme: W8A8
"""
# examples/quantization_w8a8_int8/llama3_example.py as written there (mappings inferred)
W8A8_INT8_LLAMA3_PY = """
default_stage:
  default_modifiers:
    SmoothQuantModifier: {smoothing_strength: 0.8}
    GPTQModifier: {targets: Linear, scheme: W8A8, ignore: [lm_head]}
"""
# examples/quantization_non_uniform/quantization_fp8_multiple_strategies.py
FP8_MULTIPLE_STRATEGIES = """
quant_stage:
    quant_modifiers:
        QuantizationModifier:
            ignore: ["lm_head"]
            config_groups:
                group_0:
                    weights: {num_bits: 8, type: float, strategy: channel, dynamic: false, symmetric: true}
                    input_activations: {num_bits: 8, type: float, strategy: token, dynamic: true, symmetric: true}
                    targets: ["re:.*self_attn.k_proj.*", "re:.*self_attn.o_proj.*",
                        "re:.*self_attn.q_proj.*", "re:.*self_attn.v_proj.*"]
                group_1:
                    weights: {num_bits: 8, type: float, strategy: tensor, dynamic: false, symmetric: true}
                    input_activations: {num_bits: 8, type: float, strategy: token, dynamic: true, symmetric: true}
                    targets: ["re:.*down_proj.*", "re:.*gate_proj.*", "re:.*up_proj.*"]
"""
# examples/quantization_non_uniform/quantization_int4_int8.py
INT4_INT8 = """
quant_stage:
    quant_modifiers:
        GPTQModifier:
            ignore: ["lm_head"]
            config_groups:
                group_0:
                    weights: {num_bits: 8, type: int, strategy: group, dynamic: false, symmetric: true,
                              group_size: 128}
                    targets: ["re:.*down_proj.*"]
                group_1:
                    weights: {num_bits: 4, type: int, strategy: group, dynamic: false, symmetric: false,
                              group_size: 128}
                    targets: ["re:.*self_attn.k_proj.*", "re:.*self_attn.o_proj.*",
                        "re:.*self_attn.q_proj.*", "re:.*self_attn.v_proj.*",
                        "re:.*gate_proj.*", "re:.*up_proj.*"]
"""


def imported(text: str):
    return from_llm_compressor(yaml.safe_load(text))


def ct_args_fields(spec_dict: dict, weights: bool) -> dict:
    """A qdoctor QuantSpec dict written back as compressed-tensors QuantizationArgs (the exporter's
    mapping, the other direction), reduced to the fields a preset fixes."""
    from qdoctor.export.ctconfig import quantization_args
    from qdoctor.quant.spec import QuantSpec

    a = quantization_args(QuantSpec.from_dict(spec_dict), weights=weights)
    return {k: getattr(a, k) for k in ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic")}


def test_w8a8_int8_llama3_field_by_field():
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    r = imported(W8A8_INT8_LLAMA3)
    d = r.recipe
    assert d["qdoctor_recipe"] == 1
    assert d["smoothing"] == [{"method": "smoothquant", "alpha": 0.8,
                               "layers": ["*q_proj*", "*k_proj*", "*v_proj*", "*gate_proj*", "*up_proj*"]}]
    s = d["scheme"]
    assert s["ignore"] == ["lm_head"] and s["overrides"] == {}
    preset = PRESET_SCHEMES["W8A8"]  # the second derivation: compressed-tensors' own preset
    for role, key, weights in (("weights", "weights", True), ("activations", "input_activations", False)):
        want = preset[key]
        assert ct_args_fields(s["default"][role], weights) == \
            {k: getattr(want, k) for k in ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic")}
    assert s["default"] == {"weights": {"dtype": "int8", "granularity": "channel", "dynamic": False},
                            "activations": {"dtype": "int8", "granularity": "token", "dynamic": True}}
    # GPTQModifier's defaults (dampening_frac 0.01, actorder static, block_size 128), sequential pipeline
    assert d["gptq"] == {"dampening": 0.01, "act_order": True, "block_size": 128, "propagate": True}
    assert "rotation" not in d
    assert any(n.startswith("calibration data") for n in r.notes)
    assert any("max−min" in n for n in r.notes)  # SmoothQuant's range definition differs: said
    assert all("\n" not in n for n in r.notes)


def test_python_example_with_inferred_mappings_is_the_same_plan():
    a, b = imported(W8A8_INT8_LLAMA3), imported(W8A8_INT8_LLAMA3_PY)
    assert a.recipe == b.recipe
    assert any("mappings not given" in n for n in b.notes)


def test_smoothing_globs_select_the_norm_pairs_only():
    """llm-compressor's mappings smooth input_layernorm → q/k/v and post_attention_layernorm → gate/up;
    qdoctor's default '*' would also smooth v → o and up → down: the globs must select exactly the two."""
    from qdoctor.models.registry import arch_for_model_type

    layers = imported(W8A8_INT8_LLAMA3).recipe["smoothing"][0]["layers"]
    arch = arch_for_model_type("llama")
    chosen = [p.producer for p in arch.pairs
              if any(fnmatch.fnmatchcase(f"model.layers.3.{c}", g) for c in p.consumers for g in layers)]
    assert chosen == ["input_layernorm", "post_attention_layernorm"]


def compressed_tensors_scheme_of(name: str, module: nn.Module, config_groups: dict, ignore: list[str]):
    """The config group compressed-tensors gives a module (lifecycle/apply.py: apply_quantization_config)."""
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.utils.match import is_match, match_targets

    target_to_scheme = OrderedDict()
    for gname, g in config_groups.items():
        for t in g["targets"]:
            target_to_scheme[t] = gname
    if not any(is_match(name, module, t) for t in target_to_scheme) or is_match(name, module, ignore):
        return None
    QuantizationScheme.model_validate(config_groups[target_to_scheme[next(iter(target_to_scheme))]])
    return target_to_scheme[match_targets(name, module, target_to_scheme)[0]]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_fp8_multiple_strategies_layer_by_layer(family):
    """Every linear layer of a model gets the scheme compressed-tensors would give it (or none)."""
    from helpers import tiny_model

    text = yaml.safe_load(FP8_MULTIPLE_STRATEGIES)
    mod = text["quant_stage"]["quant_modifiers"]["QuantizationModifier"]
    d = from_llm_compressor(text).recipe
    scheme = Scheme.from_dict(d["scheme"])
    want_ls = {"group_0": LayerScheme.from_dict({"weights": {"dtype": "fp8", "granularity": "channel"},
                                                 "activations": {"dtype": "fp8", "granularity": "token",
                                                                 "dynamic": True}}),
               "group_1": LayerScheme.from_dict({"weights": {"dtype": "fp8", "granularity": "tensor"},
                                                 "activations": {"dtype": "fp8", "granularity": "token",
                                                                 "dynamic": True}})}
    model = tiny_model(family)
    seen = set()
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        group = compressed_tensors_scheme_of(name, m, mod["config_groups"], mod["ignore"])
        got = scheme.resolve(name)
        assert got == (want_ls[group] if group else None), name
        seen.add(group)
    assert seen == {"group_0", "group_1", None}  # lm_head is the None


def test_int4_int8_example_is_refused_with_the_reason():
    with pytest.raises(QDoctorError, match="4-bit int weights: qdoctor quantizes to 8 bits only"):
        imported(INT4_INT8)


def test_int8_group_of_the_mixed_example_alone_maps(tiny=None):
    """Its INT8 group on its own (down_proj only): down_proj per-group(128) weight-only, the rest untouched."""
    data = yaml.safe_load(INT4_INT8)
    groups = data["quant_stage"]["quant_modifiers"]["GPTQModifier"]["config_groups"]
    del groups["group_1"]
    d = from_llm_compressor(data).recipe
    s = Scheme.from_dict(d["scheme"])
    assert s.resolve("model.layers.0.mlp.down_proj") == LayerScheme.from_dict(
        {"weights": {"dtype": "int8", "granularity": "group:128"}, "activations": None})
    for rel in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj"):
        assert s.resolve(f"model.layers.7.{rel}") is None
    assert s.resolve("lm_head") is None
    assert d["gptq"]["act_order"] is True


@pytest.mark.parametrize("pattern", [r".*q_proj", r".*self_attn.k_proj.*", r"model\.layers\.\d+\.mlp\.down_proj$",
                                     r"^model.layers.1.self_attn.(q|k|v)_proj$", r".*(?:gate_proj|up_proj)$",
                                     r".*layers\.0\..*"])
def test_regex_to_globs_selects_what_re_match_selects(pattern):
    globs = regex_to_globs(pattern)
    for n in sample_names():
        assert any(fnmatch.fnmatchcase(n, g) for g in globs) == (re.match(pattern, n) is not None), (n, globs)


@pytest.mark.parametrize("yaml_text,needle", [
    ("s_stage: {m_modifiers: {QuIPModifier: {rotations: [v]}}}", "not the same transform"),
    ("s_stage: {m_modifiers: {SpinQuantModifier: {rotations: [R1, R3]}, QuantizationModifier: {scheme: W8A8}}}",
     "R3"),
    ("s_stage: {m_modifiers: {AWQModifier: {}}}", "no qdoctor equivalent"),
    ("s_stage: {m_modifiers: {QuantizationModifier: {scheme: W8A8, kv_cache_scheme: {num_bits: 8}}}}", "kv_cache"),
    ("s_stage: {m_modifiers: {QuantizationModifier: {config_groups: {g: {targets: [Linear], weights: "
     "{num_bits: 8, symmetric: false, strategy: channel}}}}}}", "asymmetric"),
    ("s_stage: {m_modifiers: {QuantizationModifier: {scheme: FP8_BLOCK}}}", "strategy 'block'"),
    ("s_stage: {m_modifiers: {QuantizationModifier: {scheme: W8A8}, SmoothQuantModifier: {}}}",
     "smooths before it quantizes"),
    ("s_stage: {m_modifiers: {SmoothQuantModifier: {mappings: [[['re:.*q_proj'], 're:.*input_layernorm']]},"
     " QuantizationModifier: {scheme: W8A8}}}", "balancing only some"),
    ("s_stage: {m_modifiers: {SmoothQuantModifier: {mappings: [[['re:.*o_proj'], 're:.*input_layernorm']]},"
     " QuantizationModifier: {scheme: W8A8}}}", "names no qdoctor smoothing pair"),
    ("s_stage: {m_modifiers: {QuantizationModifier: {scheme: W8A8, targets: [Embedding]}}}", "target class"),
    ("s_stage: {m_modifiers: {QuantizationModifier: {scheme: W8A8, targets: ['re:.*[qk]_proj']}}}",
     "no glob equivalent"),
    ("s_stage: {m_modifiers: {QuantizationModifier: {scheme: W8A8, start: 2}}}", "one-shot"),
    ("s_stage: {m_modifiers: {QuantizationModifier: {scheme: W8A8, wrong_field: 1}}}", "unknown field"),
    ("s_stage: {m_modifiers: {SmoothQuantModifier: {smoothing_strength: 0.5}}}", "nothing to quantize"),
])
def test_refusals_name_the_field(yaml_text, needle):
    with pytest.raises(QDoctorError, match=re.escape(needle)):
        from_llm_compressor(yaml.safe_load(yaml_text))


def test_spinquant_maps_to_rotation_keys():
    d = from_llm_compressor(yaml.safe_load(
        "s_stage: {m_modifiers: {SpinQuantModifier: {rotations: [R1, R2, R4]}, QuantizationModifier: {scheme: W8A8}}}"
    )).recipe
    assert d["rotation"] == {"r1": True, "r2": True, "r4": True}
    assert "gptq" not in d  # RTN: a QuantizationModifier rounds to nearest
    d = from_llm_compressor(yaml.safe_load(
        "SpinQuantModifier: {}\nQuantizationModifier: {scheme: FP8_DYNAMIC}")).recipe  # modifiers at the top
    assert d["rotation"] == {"r1": True, "r2": True, "r4": False}  # llm-compressor's default [R1, R2]
    assert d["scheme"]["default"]["weights"] == {"dtype": "fp8", "granularity": "channel", "dynamic": False}


def test_observers_and_gptq_fields():
    d = from_llm_compressor(yaml.safe_load("""
quant_stage:
  quant_modifiers:
    GPTQModifier:
      scheme: W8A8
      weight_observer: mse
      dampening_frac: 0.05
      block_size: 64
      actorder: null
""")).recipe
    assert d["scheme"]["default"]["weights"]["observer"] == "mse"
    assert d["gptq"] == {"dampening": 0.05, "act_order": False, "block_size": 64, "propagate": True}
    d = from_llm_compressor(yaml.safe_load(
        "QuantizationModifier: {scheme: FP8, ignore: [lm_head]}")).recipe  # static FP8: static_minmax
    assert d["scheme"]["default"]["activations"] == {"dtype": "fp8", "granularity": "tensor", "dynamic": False}


def test_format_detection(tmp_path):
    qd = Recipe.from_dict(imported(W8A8_INT8_LLAMA3_PY).recipe | {"gptq": None} and
                          {k: v for k, v in imported(W8A8_INT8_LLAMA3_PY).recipe.items() if k != "gptq"})
    assert not is_lc_recipe(qd.to_dict()) and is_lc_recipe(yaml.safe_load(W8A8_INT8_LLAMA3))
    p = tmp_path / "qd.json"
    p.write_text(json.dumps(qd.to_dict()))
    again, notes = read_recipe(str(p))
    assert again.to_dict() == qd.to_dict() and notes == []
    lc = tmp_path / "lc.yaml"
    lc.write_text("QuantizationModifier: {scheme: W8A8, ignore: [lm_head]}\n")
    r, notes = read_recipe(str(lc))
    assert r.scheme.default.describe() == "int8 W:channel A:token-dynamic" and notes


def test_lc_recipe_equals_qdoctor_plan(tiny_llama_dir, tmp_path):
    """SmoothQuant 0.8 + W8A8 (round to nearest: QuantizationModifier) read from an llm-compressor file
    gives the PPL of qdoctor's own plan written by hand (SmoothQuant 0.8 on the two norm pairs)."""
    import qdoctor
    from qdoctor.calib.collect import CalibrationConfig
    from qdoctor.calib.text import text_source
    from qdoctor.eval.perplexity import token_windows
    from qdoctor.models.registry import bos_token_id
    from qdoctor.quant.spec import get_scheme
    from qdoctor.transforms.smoothing import SmoothingStep

    lc = tmp_path / "lc.yaml"
    lc.write_text(W8A8_INT8_LLAMA3.replace("GPTQModifier", "QuantizationModifier"))
    recipe, _ = read_recipe(str(lc))
    cal = CalibrationConfig(n_samples=4, seqlen=64)  # the file carries none; small for the test
    recipe.calibration = cal
    model, tok = qdoctor.load(str(tiny_llama_dir))
    own = Recipe(scheme=get_scheme("w8a8-channel-token"),
                 smoothing=[SmoothingStep("smoothquant", 0.8, ("*.self_attn.q_proj", "*.mlp.up_proj"))],
                 calibration=cal)
    windows = token_windows(tok, text_source("wikitext2:test"), 64, bos_token_id(model, tok))
    got = recipe.perplexity(model, tok, windows, limit=2)[0].ppl
    ppl = own.perplexity(model, tok, windows, limit=2)[0].ppl
    assert got == pytest.approx(ppl, rel=1e-6)
    plain = Recipe(scheme=get_scheme("w8a8-channel-token")).perplexity(model, tok, windows, limit=2)[0].ppl
    assert ppl != plain  # the smoothing did something


def test_quantize_cli_reads_an_lc_recipe_and_prints_its_notes(tiny_llama_dir, tmp_path, capsys):
    from qdoctor.cli import main

    lc = tmp_path / "lc.yaml"
    lc.write_text("quant_stage:\n  quant_modifiers:\n    QuantizationModifier: {scheme: FP8_DYNAMIC, ignore: [lm_head]}\n")
    out = tmp_path / "q.json"
    assert main(["quantize", "--model", str(tiny_llama_dir), "--recipe", str(lc), "--seqlen", "64", "--limit", "1",
                 "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"{lc}: note: calibration data" in err
    got = json.loads(out.read_text())
    assert got["quantized_layers"] == 14 and got["kept_layers"] == 0  # 2 blocks × 7; lm_head ignored
