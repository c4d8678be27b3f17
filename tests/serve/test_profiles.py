"""Runtime profiles: one violating hand-made plan per rule, and the rules checked against a second
transcription of vLLM's scheme selection written over compressed-tensors' QuantizationArgs."""

import itertools
from types import SimpleNamespace

import pytest

from qdoctor.errors import QDoctorError
from qdoctor.export.ctconfig import quantization_scheme
from qdoctor.quant.granularity import PerToken
from qdoctor.quant.spec import LayerScheme, QuantSpec, Scheme, granularity_from_str
from qdoctor.serve.profiles import RULES, ServeProfile, check_plan, fused_groups_of, refuse, vllm_kernel

NAMES = [f"model.layers.{i}.{r}" for i in range(2) for r in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
VLLM = ServeProfile("vllm")


def ls(w=("int8", "channel"), a=("int8", "token", True)):
    wq = QuantSpec(w[0], granularity_from_str(w[1]))
    aq = None if a is None else QuantSpec(a[0], granularity_from_str(a[1]), a[2])
    return LayerScheme(wq, aq)


def plan(default=None, **overrides):
    return Scheme("t", default or ls(), {k.replace("__", "."): v for k, v in overrides.items()})


def rules_hit(recipe, profile=VLLM, names=NAMES):
    return {v.rule for v in check_plan(recipe, names, profile)}


def test_servable_plans_have_no_violation():
    assert check_plan(plan(), NAMES, VLLM) == []
    assert check_plan(plan(ls(("int8", "channel"), ("int8", "tensor", False))), NAMES, VLLM) == []
    assert check_plan(plan(ls(("fp8", "channel"), ("fp8", "token", True))), NAMES, ServeProfile("vllm", "ada")) == []


@pytest.mark.parametrize("rule,scheme,profile", [
    ("int8-group-w8a8", plan(ls(("int8", "group:32"))), VLLM),
    ("int8-group-w8a8", plan(ls(("int8", "group:32"), ("int8", "tensor", False))),
     ServeProfile("vllm", allow_optional_kernels=True)),
    ("int8-activations", plan(ls(("int8", "channel"), ("int8", "tensor", True))), VLLM),
    ("int8-activations", plan(ls(("int8", "channel"), ("int8", "group:64", True))), VLLM),
    ("int8-weight-only", plan(ls(("int8", "tensor"), None)), VLLM),
    ("fp8-granularity", plan(ls(("fp8", "group:128"), ("fp8", "token", True))), VLLM),
    ("fp8-activations", plan(ls(("fp8", "channel"), ("fp8", "tensor", True))), VLLM),
    ("fp8-gpu", plan(ls(("fp8", "channel"), ("fp8", "tensor", False))), ServeProfile("vllm", "ampere")),
    ("fused-shards", plan(**{"model.layers.1.self_attn.k_proj": LayerScheme(keep="bf16")}), VLLM),
])
def test_each_rule_refuses_its_plan_in_one_line(rule, scheme, profile):
    got = check_plan(scheme, NAMES, profile)
    assert {v.rule for v in got} == {rule}
    (v,) = got
    assert v.layers and "\n" not in v.line() and v.line().startswith(rule + ": ")
    with pytest.raises(QDoctorError) as e:
        refuse(got, profile)
    assert rule in str(e.value) and "\n" not in str(e.value)
    assert RULES[rule].source.startswith("vllm-project/vllm ")  # every rule says where it was read
    # transformers and "any" serve every plan qdoctor can hold
    assert check_plan(scheme, NAMES, ServeProfile("transformers")) == []
    assert check_plan(scheme, NAMES, ServeProfile("any")) == []


def test_fused_violation_names_the_group_and_layers():
    (v,) = check_plan(plan(**{"model.layers.1.mlp.up_proj": ls(("int8", "tensor"), ("int8", "tensor", False))}),
                      NAMES, VLLM)
    assert v.layers == ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj")
    assert "gate_proj: int8 W:channel" in v.reason and "up_proj: int8 W:tensor" in v.reason
    # a kept shard and an ignored one are both floating point to vLLM: same ignore status, no violation
    s = Scheme("t", ls(), {"model.layers.0.self_attn.*_proj": LayerScheme(keep="bf16")},
               ignore=("model.layers.0.self_attn.q_proj",))
    assert rules_hit(s) == set()


def test_online_hadamard_needs_tp_1():
    rot = SimpleNamespace(r1=True, r2=True, r4=True)
    recipe = SimpleNamespace(scheme=plan(), rotation=rot)
    (v,) = check_plan(recipe, NAMES, ServeProfile("vllm", tp=2))
    assert v.rule == "online-hadamard-tp" and all(n.endswith("down_proj") for n in v.layers) and len(v.layers) == 2
    assert check_plan(recipe, NAMES, ServeProfile("vllm", tp=1)) == []
    assert check_plan(SimpleNamespace(scheme=plan(), rotation=SimpleNamespace(r1=True, r2=True, r4=False)),
                      NAMES, ServeProfile("vllm", tp=4)) == []


def test_humming_needs_pack_quantized():
    k = vllm_kernel(ls(("int8", "group:128")), ServeProfile("vllm", allow_optional_kernels=True))
    assert k.kernel.startswith("CompressedTensorsWNA8Int") and k.format == "pack-quantized" and k.optional
    assert vllm_kernel(ls(("int8", "group:128")), VLLM).kernel is None


def test_fused_groups_from_names():
    assert fused_groups_of(NAMES)[:2] == [tuple(NAMES[0:3]), tuple(NAMES[4:6])]


def test_profile_validation():
    for bad in (dict(runtime="sglang"), dict(gpu="volta"), dict(tp=0)):
        with pytest.raises(QDoctorError):
            ServeProfile(**bad)


# --- a second derivation: vLLM's _get_scheme_from_parts transcribed over QuantizationArgs ----------

def _strategy(q):
    return getattr(q.strategy, "value", q.strategy)


def _type(q):
    return getattr(q.type, "value", q.type)


def vllm_reference(w, a, fmt: str, capability: int) -> str | None:
    """compressed_tensors.py (vLLM, 2026-12): the predicates in the order the method tries them."""
    if a is not None and fmt == "pack-quantized" and _type(w) == "int" and _strategy(w) in ("channel", "group") \
            and _type(a) == "int" and a.symmetric and a.dynamic and _strategy(a) in ("token", "group") \
            and a.num_bits == 8:
        return "WNA8Int"
    if a is None and _strategy(w) in ("channel", "group") and fmt == "pack-quantized":
        return "WNA16"
    if fmt not in ("int-quantized", "float-quantized", "naive-quantized"):
        return None
    if a is not None and _type(w) == _type(a) == "float" and _strategy(w) in ("tensor", "channel", "block"):
        if a.dynamic or _strategy(a) == "tensor":
            return "W8A8Fp8" if capability >= 89 else "W8A16Fp8"
    if _type(w) == "float" and _strategy(w) in ("tensor", "channel", "block"):
        return "W8A16Fp8"
    if a is None:
        return None
    if _strategy(w) in ("tensor", "channel") and _strategy(a) == "tensor" and not a.dynamic:
        return "W8A8Int8"
    if _strategy(w) in ("tensor", "channel") and _strategy(a) == "token" and a.dynamic:
        return "W8A8Int8"
    return None


def _all_layer_schemes():
    for dt, wg, act in itertools.product(("int8", "fp8"), ("tensor", "channel", "group:128"),
                                         (None, ("tensor", False), ("tensor", True), ("token", True),
                                          ("group:128", True))):
        try:
            yield ls((dt, wg), None if act is None else (dt, act[0], act[1]))
        except QDoctorError:  # not a scheme qdoctor can hold (e.g. static per-token)
            continue


@pytest.mark.parametrize("gpu,optional", [("hopper", False), ("hopper", True), ("ampere", False)])
def test_rules_agree_with_vllm_selection(gpu, optional):
    profile = ServeProfile("vllm", gpu, allow_optional_kernels=optional)
    n = 0
    for layer in _all_layer_schemes():
        choice = vllm_kernel(layer, profile)
        ct = quantization_scheme(layer, ["x"], choice.format)
        ref = vllm_reference(ct.weights, ct.input_activations, getattr(ct.format, "value", ct.format),
                             profile.capability)
        # a W8A8 plan served as W8A16 (FP8 on Ampere) is not the measured plan; Humming only when allowed
        # and vLLM quantizes dynamic FP8 activations per token (CompressedTensorsW8A8Fp8.act_q_group_shape)
        a = layer.activations
        runs_as_planned = ref is not None and not (ref == "W8A16Fp8" and a is not None) \
            and (ref != "WNA8Int" or optional) \
            and not (ref == "W8A8Fp8" and a.dynamic and not isinstance(a.granularity, PerToken))
        assert (choice.kernel is not None) == runs_as_planned, (layer.describe(), ref, choice)
        n += 1
    assert n >= 20
