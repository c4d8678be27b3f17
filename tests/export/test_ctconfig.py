"""The qdoctor → compressed-tensors mapping, without a model: args, targets, vLLM rules, dtypes."""

from collections import OrderedDict

import pytest

from qdoctor.errors import QDoctorError
from qdoctor.export.ctconfig import (
    check_kept_dtypes,
    compact_targets,
    fused_shard_warnings,
    plan_export,
    quantization_args,
    vllm_issue,
)
from qdoctor.quant.granularity import granularity_from_str
from qdoctor.quant.spec import LayerScheme, QuantSpec

BLOCK = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def llama_names(n_blocks: int = 4) -> list[str]:
    return [f"model.layers.{i}.{s}" for i in range(n_blocks) for s in BLOCK] + ["lm_head"]


def spec(dtype="int8", gran="channel", dynamic=False, observer="absmax"):
    return QuantSpec(dtype=dtype, granularity=granularity_from_str(gran), dynamic=dynamic, observer=observer)


def ls(w=("int8", "channel"), a=("int8", "token", True)):
    return LayerScheme(weights=spec(*w), activations=spec(*a) if a else None)


@pytest.mark.parametrize("qspec,weights,expected", [
    (spec("int8", "channel"), True, dict(type="int", strategy="channel", group_size=None, dynamic=False,
                                         observer="memoryless_minmax")),
    (spec("int8", "group:64"), True, dict(type="int", strategy="group", group_size=64, dynamic=False)),
    (spec("fp8", "tensor"), True, dict(type="float", strategy="tensor", group_size=None)),
    (spec("int8", "token", True), False, dict(type="int", strategy="token", dynamic=True, observer=None)),
    (spec("int8", "tensor", False), False, dict(type="int", strategy="tensor", dynamic=False,
                                                observer="static_minmax")),
    (spec("int8", "tensor", False, "percentile:99.9"), False, dict(strategy="tensor", dynamic=False, observer=None)),
    (spec("fp8", "tensor", True), False, dict(type="float", strategy="tensor", dynamic=True)),
    (spec("int8", "group:32", True), False, dict(strategy="group", group_size=32, dynamic=True)),
])
def test_quantization_args_mapping(qspec, weights, expected):
    args = quantization_args(qspec, weights=weights)
    assert args.num_bits == 8 and args.symmetric is True
    for k, v in expected.items():
        assert getattr(args, k) == v, k


def test_single_group_uses_class_target_and_ignores_the_rest():
    names = llama_names(2)
    layers = OrderedDict((n, None if n == "lm_head" else ls()) for n in names)
    layers["model.layers.1.mlp.down_proj"] = LayerScheme(keep="bf16")
    plan = plan_export(layers)
    (g,) = plan.groups
    assert g.targets == ["Linear"] and g.format == "int-quantized"
    assert plan.config.ignore == ["model.layers.1.mlp.down_proj", "lm_head"]
    assert plan.config.format == "int-quantized"
    assert plan.kept == {"model.layers.1.mlp.down_proj": "bf16"}


def test_several_groups_use_disjoint_name_targets():
    names = llama_names(4)
    layers = OrderedDict((n, None if n == "lm_head" else ls()) for n in names)
    for i in range(4):  # all q/k/v per-group, down_proj of blocks 0 and 2 FP8
        for s in ("q_proj", "k_proj", "v_proj"):
            layers[f"model.layers.{i}.self_attn.{s}"] = ls(("int8", "group:32"))
    for i in (0, 2):
        layers[f"model.layers.{i}.mlp.down_proj"] = ls(("fp8", "channel"), ("fp8", "token", True))
    plan = plan_export(layers)
    assert [len(g.layers) for g in plan.groups] == [12, 14, 2]
    by_name = {g.name: g for g in plan.groups}
    assert by_name["group_0"].targets == [r"re:model\.layers\.\d+\.self_attn\.(?:q_proj|k_proj|v_proj)$"]
    assert r"re:model\.layers\.(?:0|2)\.mlp\.down_proj$" in by_name["group_2"].targets
    assert plan.config.format == "mixed-precision"
    from compressed_tensors.utils.match import match_name

    for n, expected in layers.items():  # every layer matched by exactly its own group
        hits = [g.name for g in plan.groups if any(match_name(n, t) for t in g.targets)]
        assert hits == ([] if expected is None else [plan.group_of()[n].name]), n


def test_compact_targets_falls_back_to_exact_names_for_single_blocks():
    names = llama_names(3)
    assert compact_targets(["model.layers.1.mlp.up_proj"], names) == ["model.layers.1.mlp.up_proj"]
    t = compact_targets(["model.layers.0.mlp.up_proj", "model.layers.2.mlp.up_proj", "lm_head"], names)
    assert t == [r"re:model\.layers\.(?:0|2)\.mlp\.up_proj$", "lm_head"]


def test_regex_does_not_catch_longer_indices():
    names = [f"model.layers.{i}.mlp.up_proj" for i in range(12)]
    t = compact_targets(["model.layers.1.mlp.up_proj", "model.layers.2.mlp.up_proj"], names)
    from compressed_tensors.utils.match import match_name

    assert not any(match_name("model.layers.11.mlp.up_proj", x) for x in t)
    assert not any(match_name("model.layers.1.mlp.up_proj_extra", x) for x in t)


@pytest.mark.parametrize("layer,issue", [
    (ls(("int8", "channel"), ("int8", "token", True)), None),
    (ls(("int8", "tensor"), ("int8", "tensor", False)), None),
    (ls(("int8", "channel"), ("int8", "tensor", True)), "static per-tensor or dynamic per-token"),
    (ls(("int8", "group:128"), ("int8", "token", True)), "not per-group"),
    (ls(("int8", "channel"), ("int8", "group:64", True)), "static per-tensor or dynamic per-token"),
    (ls(("int8", "group:128"), None), None),
    (ls(("int8", "tensor"), None), "per-channel or per-group"),
    (ls(("fp8", "channel"), ("fp8", "token", True)), None),
    (ls(("fp8", "tensor"), ("fp8", "tensor", False)), None),
    (ls(("fp8", "group:128"), ("fp8", "token", True)), "not per-group"),
    (ls(("fp8", "channel"), ("fp8", "group:128", True)), "block weights"),
    (ls(("fp8", "channel"), None), None),
    (LayerScheme(keep="bf16"), None),
])
def test_vllm_rules(layer, issue):
    got = vllm_issue(layer)
    assert (got is None) if issue is None else (issue in got)


def test_fused_shards_must_agree_for_vllm():
    names = llama_names(1)
    layers = OrderedDict((n, ls()) for n in names)
    assert fused_shard_warnings(layers) == []
    layers["model.layers.0.self_attn.k_proj"] = LayerScheme(keep="bf16")
    (w,) = fused_shard_warnings(layers)
    assert "qkv_proj" in w and "k_proj: keep bf16" in w
    layers["model.layers.0.mlp.up_proj"] = None
    assert len(fused_shard_warnings(layers)) == 2


@pytest.mark.parametrize("kept,dtype,ok", [
    ({"a": "bf16", "b": "fp16"}, "fp32", True),
    ({"a": "bf16"}, "bf16", True),
    ({"a": "fp16"}, "bf16", False),  # fp16 → bf16 drops mantissa bits
    ({"a": "bf16"}, "fp16", False),  # bf16 → fp16 can overflow
    ({"a": "fp32"}, "bf16", False),  # would run in bf16
    ({"a": "fp32"}, "fp32", True),
])
def test_kept_dtypes_in_one_checkpoint(kept, dtype, ok):
    import torch

    d = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    if ok:
        check_kept_dtypes(kept, d)
    else:
        with pytest.raises(QDoctorError, match="checkpoint dtype"):
            check_kept_dtypes(kept, d)


def test_nothing_quantized_is_refused():
    layers = OrderedDict([("model.layers.0.mlp.up_proj", LayerScheme(keep="bf16")), ("lm_head", None)])
    with pytest.raises(QDoctorError, match="no layer is quantized"):
        plan_export(layers)


def test_config_accepted_by_compressed_tensors_and_transformers_parsers():
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import CompressedTensorsConfig

    names = llama_names(2)
    layers = OrderedDict((n, None if n == "lm_head" else ls()) for n in names)
    layers["model.layers.0.mlp.down_proj"] = ls(("fp8", "tensor"), ("fp8", "tensor", False))
    layers["model.layers.1.mlp.down_proj"] = ls(("int8", "group:64"), None)
    plan = plan_export(layers)
    dumped = plan.config.model_dump()
    again = QuantizationConfig.model_validate(dumped)
    assert again.model_dump() == dumped
    hf = CompressedTensorsConfig.from_dict({"quantization_config": {**dumped, "quant_method": "compressed-tensors"}})
    assert set(hf.quantization_config.config_groups) == {"group_0", "group_1", "group_2"}
    assert {g.format for g in plan.groups} == {"int-quantized", "float-quantized", "pack-quantized"}
