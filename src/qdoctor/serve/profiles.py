"""Runtime profiles: which plans a serving stack actually runs, as data.

A profile is a runtime (``vllm``, ``transformers``, ``any``) with its options (``gpu``, ``tp``,
``allow_optional_kernels``). Its rules are ``Rule`` objects in ``RULES`` — each with a name, the
runtimes it binds, a one-line reason, the source it was read from (repository path + what the
code says) and a check over the plan — so a new fact is a new entry, not a new branch.

    check_plan(recipe, model_or_layer_names, profile) -> [Violation(rule, layers, reason)]

``transformers`` has no rule beyond what export itself enforces (every scheme qdoctor can hold
maps to a compressed-tensors ``QuantizationScheme``, which transformers loads and simulates);
``any`` has none.

The plan is looked at as every linear layer's resolved ``LayerScheme`` (None: left in floating
point), the fused groups (q/k/v, gate/up of each block: ``ArchSpec.input_groups`` for a model,
the vLLM ``packed_modules_mapping`` names for a list of names) and the recipe's rotation.

``vllm_kernel(layer_scheme, profile)`` names the vLLM scheme class that serves a layer and the
storage format it needs (the Humming path needs ``pack-quantized``, which compressed-tensors'
format inference does not pick for INT8 W8A8): export writes that format and the model card
lists the kernels.

Sources: vLLM ``vllm/model_executor/layers/quantization/compressed_tensors/`` read with the
search tool (2026-12): ``compressed_tensors.py`` (``_get_scheme_from_parts`` and its
``_is_*`` predicates), ``schemes/compressed_tensors_wNa8.py``, ``schemes/compressed_tensors_w8a8_fp8.py``,
``utils.py`` (``should_ignore_layer``), ``transform/module.py`` (``HadamardTransform``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from qdoctor.errors import QDoctorError
from qdoctor.models.registry import arch_for, get_blocks
from qdoctor.quant.granularity import PerChannel, PerGroup, PerTensor, PerToken
from qdoctor.quant.spec import LayerScheme, Scheme

RUNTIMES = ("vllm", "transformers", "any")
RUNTIME_NAMES = {"vllm": "vLLM", "transformers": "transformers", "any": "any runtime"}
# CUDA compute capability of each GPU generation (sm_80, sm_89, sm_90)
GPU_CAPABILITY = {"ampere": 80, "ada": 89, "hopper": 90}
FP8_W8A8_MIN_CAPABILITY = 89  # CompressedTensorsW8A8Fp8.get_min_capability(): "lovelace and up"

VLLM_SRC = "vllm-project/vllm vllm/model_executor/layers/quantization/compressed_tensors/"
# vLLM fuses these shards into one GEMM (``packed_modules_mapping`` of its LLaMA-like models);
# every shard of one fused layer must then share a scheme, or all be ignored.
FUSED_SHARDS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class ServeProfile:
    """Where the checkpoint will run. ``gpu``/``tp``/``allow_optional_kernels`` matter for vLLM only."""

    runtime: str = "vllm"
    gpu: str = "hopper"
    tp: int = 1
    allow_optional_kernels: bool = False

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise QDoctorError(f"unknown serving runtime {self.runtime!r}: use one of {', '.join(RUNTIMES)}")
        if self.gpu not in GPU_CAPABILITY:
            raise QDoctorError(f"unknown GPU {self.gpu!r}: use one of {', '.join(GPU_CAPABILITY)}")
        if not isinstance(self.tp, int) or isinstance(self.tp, bool) or self.tp < 1:
            raise QDoctorError(f"--tp must be a positive integer, got {self.tp!r}")

    @property
    def capability(self) -> int:
        return GPU_CAPABILITY[self.gpu]

    @property
    def fp8(self) -> bool:
        """Whether FP8 W8A8 runs as planned (vLLM on Ada/Hopper; transformers simulates it)."""
        return self.runtime != "vllm" or self.capability >= FP8_W8A8_MIN_CAPABILITY

    def describe(self) -> str:
        if self.runtime != "vllm":
            return self.runtime
        opt = ", optional kernels" if self.allow_optional_kernels else ""
        return f"vllm ({self.gpu}, tp {self.tp}{opt})"

    def to_dict(self) -> dict:
        return {"runtime": self.runtime, "gpu": self.gpu, "tp": self.tp,
                "allow_optional_kernels": self.allow_optional_kernels}


@dataclass(frozen=True)
class Violation:
    rule: str
    layers: tuple[str, ...]
    reason: str

    def line(self) -> str:
        """One line: the rule, the reason and the layers (the first two, then a count)."""
        shown = ", ".join(self.layers[:2]) + (f" (+{len(self.layers) - 2} more)" if len(self.layers) > 2 else "")
        return f"{self.rule}: {self.reason} [{shown}]" if shown else f"{self.rule}: {self.reason}"

    def to_dict(self) -> dict:
        return {"rule": self.rule, "layers": list(self.layers), "reason": self.reason}


@dataclass
class PlanView:
    """What the rules read: every linear layer → its scheme (None: floating point), the fused
    groups by full names, and the recipe's rotation (None when it has none)."""

    layers: "OrderedDict[str, LayerScheme | None]"
    fused: list[tuple[str, ...]]
    rotation: object = None


@dataclass(frozen=True)
class Rule:
    """One runtime fact. ``check(view, profile)`` returns ``[(layers, reason)]``; each becomes a
    ``Violation`` named ``name``."""

    name: str
    runtimes: tuple[str, ...]
    reason: str
    source: str
    check: Callable[[PlanView, ServeProfile], list[tuple[tuple[str, ...], str]]] = field(repr=False)


@dataclass(frozen=True)
class KernelChoice:
    """The vLLM scheme class serving a layer (None: none does), why not, and the storage format
    it needs when that is not the one compressed-tensors infers."""

    kernel: str | None
    why_not: str = ""
    format: str | None = None
    optional: bool = False


def _per_layer(reason_of: Callable[[LayerScheme, ServeProfile], str | None]):
    """A rule check from a per-layer predicate: layers grouped by their (one-line) reason."""

    def check(view: PlanView, profile: ServeProfile):
        found: "OrderedDict[str, list[str]]" = OrderedDict()
        for name, ls in view.layers.items():
            if ls is not None and ls.is_quantized:
                why = reason_of(ls, profile)
                if why:
                    found.setdefault(why, []).append(name)
        return [(tuple(names), why) for why, names in found.items()]

    return check


def _int8_w8a8(ls: LayerScheme) -> bool:
    return ls.weights.dtype == "int8" and ls.activations is not None


def _humming_acts(ls: LayerScheme) -> bool:
    """``_is_wNaM_int``: symmetric dynamic per-token or per-group INT activations."""
    a = ls.activations
    return a is not None and a.dynamic and isinstance(a.granularity, (PerToken, PerGroup))


def int8_group_w8a8(ls: LayerScheme, p: ServeProfile) -> str | None:
    if not (_int8_w8a8(ls) and isinstance(ls.weights.granularity, PerGroup)):
        return None
    if not _humming_acts(ls):
        return ("INT8 W8A8 kernels take per-tensor or per-channel weight scales, not per-group; the optional "
                "Humming kernel takes dynamic per-token/per-group activations only, not static or per-tensor")
    if not p.allow_optional_kernels:
        return ("INT8 W8A8 kernels take per-tensor or per-channel weight scales, not per-group; per-group runs "
                "only on the optional Humming kernel (CompressedTensorsWNA8Int): --allow-optional-kernels")
    return None


def int8_activations(ls: LayerScheme, p: ServeProfile) -> str | None:
    if not _int8_w8a8(ls) or isinstance(ls.weights.granularity, PerGroup):
        return None
    a = ls.activations
    if isinstance(a.granularity, PerTensor) and not a.dynamic:
        return None
    if isinstance(a.granularity, PerToken) and a.dynamic:
        return None
    if p.allow_optional_kernels and _humming_acts(ls) and isinstance(ls.weights.granularity, PerChannel):
        return None
    kind = "dynamic per-tensor" if isinstance(a.granularity, PerTensor) else "per-group"
    return f"{kind} INT8 activations match no vLLM INT8 scheme (static per-tensor or dynamic per-token only)"


def int8_weight_only(ls: LayerScheme, p: ServeProfile) -> str | None:
    if ls.weights.dtype == "int8" and ls.activations is None and isinstance(ls.weights.granularity, PerTensor):
        return "weight-only INT8 needs per-channel or per-group weights (CompressedTensorsWNA16)"
    return None


def fp8_granularity(ls: LayerScheme, p: ServeProfile) -> str | None:
    if ls.weights.dtype != "fp8":
        return None
    if isinstance(ls.weights.granularity, PerGroup):
        return "FP8 weights must be per-tensor, per-channel or 128x128 blocks, not per-group"
    return None


def fp8_activations(ls: LayerScheme, p: ServeProfile) -> str | None:
    a = ls.activations
    if ls.weights.dtype != "fp8" or a is None or not a.dynamic or isinstance(a.granularity, PerToken):
        return None
    kind = "per-group" if isinstance(a.granularity, PerGroup) else "per-tensor"
    return (f"vLLM quantizes dynamic FP8 activations per token (per-group 1x128 only with block weights), "
            f"not {kind} as planned")


def fp8_gpu(ls: LayerScheme, p: ServeProfile) -> str | None:
    if ls.weights.dtype == "fp8" and ls.activations is not None and p.capability < FP8_W8A8_MIN_CAPABILITY:
        return (f"FP8 W8A8 needs compute capability 8.9+ (Ada/Hopper); on {p.gpu} vLLM runs it as W8A16 "
                "(activations unquantized), not the measured plan")
    return None


def check_fused(view: PlanView, profile: ServeProfile):
    out = []
    for group in view.fused:
        schemes = {n: view.layers.get(n) for n in group}
        labels = {n: "floating point" if ls is None or not ls.is_quantized else ls.describe()
                  for n, ls in schemes.items()}
        if len(set(labels.values())) > 1:
            detail = ", ".join(f"{n.rpartition('.')[2]}: {v}" for n, v in labels.items())
            out.append((tuple(group), f"fused shards need one scheme ({detail})"))
    return out


def check_online_rotation(view: PlanView, profile: ServeProfile):
    rot = view.rotation
    if rot is None or not getattr(rot, "r4", False) or profile.tp == 1:
        return []
    downs = tuple(n for n in view.layers if n.endswith("down_proj"))
    return [(downs, f"online Hadamard (R4) before down_proj is not supported with tensor parallelism "
                    f"(tp {profile.tp}); use --tp 1 or a plan without r4")]


RULES: "OrderedDict[str, Rule]" = OrderedDict((r.name, r) for r in (
    Rule("int8-group-w8a8", ("vllm",),
         "per-group INT8 weights with INT8 activations need the optional Humming kernel and dynamic activations",
         VLLM_SRC + "compressed_tensors.py: _is_static_tensor_w8a8/_is_dynamic_token_w8a8 accept weight "
         "strategy tensor|channel only; _is_wNaM_int (pack-quantized, int weights channel|group, symmetric dynamic "
         "token|group activations) -> CompressedTensorsWNA8Int; schemes/compressed_tensors_wNa8.py: 'Static, "
         "per-tensor, and asymmetric activation quantization are not supported'",
         _per_layer(int8_group_w8a8)),
    Rule("int8-activations", ("vllm",),
         "INT8 W8A8 activations must be static per-tensor or dynamic per-token",
         VLLM_SRC + "compressed_tensors.py: _is_static_tensor_w8a8 (input strategy tensor, static) and "
         "_is_dynamic_token_w8a8 (input strategy token, dynamic) -> CompressedTensorsW8A8Int8; otherwise "
         "'No compressed-tensors compatible scheme was found'",
         _per_layer(int8_activations)),
    Rule("int8-weight-only", ("vllm",),
         "weight-only INT8 needs per-channel or per-group weights",
         VLLM_SRC + "compressed_tensors.py: _is_wNa16_group_channel (weight strategy channel|group, no input "
         "quantization, pack-quantized) -> CompressedTensorsWNA16",
         _per_layer(int8_weight_only)),
    Rule("fp8-granularity", ("vllm",),
         "FP8 weights per-tensor/per-channel/block only",
         VLLM_SRC + "compressed_tensors.py: _is_fp8_w8a8 requires weight strategy in [TENSOR, CHANNEL, BLOCK]",
         _per_layer(fp8_granularity)),
    Rule("fp8-activations", ("vllm",),
         "dynamic FP8 activations run per token",
         VLLM_SRC + "schemes/compressed_tensors_w8a8_fp8.py: act_q_group_shape = PER_TENSOR if "
         "is_static_input_scheme else PER_TOKEN (compressed_tensors.py _is_fp8_w8a8: 'Dynamic quantization is "
         "always supported if weights supported')",
         _per_layer(fp8_activations)),
    Rule("fp8-gpu", ("vllm",),
         "FP8 W8A8 needs an Ada or Hopper GPU",
         VLLM_SRC + "schemes/compressed_tensors_w8a8_fp8.py: get_min_capability() returns 89 ('lovelace and up'); "
         "compressed_tensors.py falls back to CompressedTensorsW8A16Fp8 when the capability check fails",
         _per_layer(fp8_gpu)),
    Rule("fused-shards", ("vllm",),
         "q/k/v and gate/up are one GEMM in vLLM and need one scheme and one ignore status",
         VLLM_SRC + "utils.py: should_ignore_layer raises 'Found a different quantization schemes for "
         "[...] in ...qkv_proj. vLLM requires all to use the same scheme.'; find_matched_target matches a fused "
         "layer through its shards (packed_modules_mapping)",
         check_fused),
    Rule("online-hadamard-tp", ("vllm",),
         "online Hadamard transforms do not run with tensor parallelism > 1",
         VLLM_SRC + "transform/module.py: HadamardTransform.__init__ raises NotImplementedError('Online transforms "
         "with tensor parallelism is not supported') when get_tensor_model_parallel_world_size() > 1",
         check_online_rotation),
))


def rules_for(profile: ServeProfile) -> list[Rule]:
    return [r for r in RULES.values() if profile.runtime in r.runtimes]


def fused_groups_of(names: list[str]) -> list[tuple[str, ...]]:
    """q/k/v and gate/up of each parent among ``names`` (vLLM's ``packed_modules_mapping``)."""
    shard_to_fused = {s: f for f, shards in FUSED_SHARDS.items() for s in shards}
    groups: "OrderedDict[tuple[str, str], list[str]]" = OrderedDict()
    for n in names:
        parent, _, leaf = n.rpartition(".")
        if leaf in shard_to_fused:
            groups.setdefault((parent, shard_to_fused[leaf]), []).append(n)
    return [tuple(g) for g in groups.values() if len(g) > 1]


def model_fused_groups(model) -> list[tuple[str, ...]]:
    """The fused groups of ``model``'s blocks: the consumers of one norm (``ArchSpec.input_groups``)."""
    arch = arch_for(model)
    rel_groups = [g for g in arch.input_groups(model.config) if len(g) > 1]
    return [tuple(f"{arch.blocks}.{i}.{r}" for r in g) for i in range(len(get_blocks(model, arch)))
            for g in rel_groups]


def plan_view(recipe, model_or_layer_names, fused: list[tuple[str, ...]] | None = None) -> PlanView:
    """The rules' view of ``recipe`` (a Recipe, or a bare Scheme) on a model or a list of layer names."""
    scheme: Scheme = recipe if isinstance(recipe, Scheme) else recipe.scheme
    if isinstance(model_or_layer_names, nn.Module):
        model = model_or_layer_names
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        fused = model_fused_groups(model) if fused is None else fused
    else:
        names = list(model_or_layer_names)
        fused = fused_groups_of(names) if fused is None else fused
    layers = OrderedDict((n, scheme.resolve(n)) for n in names)
    return PlanView(layers, fused, getattr(recipe, "rotation", None))


def check_plan(recipe, model_or_layer_names, profile: ServeProfile,
               fused: list[tuple[str, ...]] | None = None) -> list[Violation]:
    """Every way ``recipe`` breaks ``profile`` (empty: it serves)."""
    return check_view(plan_view(recipe, model_or_layer_names, fused), profile)


def check_view(view: PlanView, profile: ServeProfile) -> list[Violation]:
    """Every way the plan seen as ``view`` (layers already resolved, e.g. a quantized model's) breaks ``profile``."""
    return [Violation(rule.name, layers, reason) for rule in rules_for(profile)
            for layers, reason in rule.check(view, profile)]


def layer_servable(ls: LayerScheme, profile: ServeProfile) -> bool:
    """Whether one layer scheme breaks no per-layer rule of ``profile`` (fused groups aside)."""
    view = PlanView(OrderedDict([("layer", ls)]), [], None)
    return not any(rule.check(view, profile) for rule in rules_for(profile) if rule.name != "fused-shards")


def refuse(violations: list[Violation], profile: ServeProfile, what: str = "this plan") -> None:
    """A one-line-per-violation ``QDoctorError`` when there is any."""
    if violations:
        lines = "; ".join(v.line() for v in violations)
        where = f" on {profile.gpu} (tp {profile.tp})" if profile.runtime == "vllm" else ""
        raise QDoctorError(f"{RUNTIME_NAMES[profile.runtime]} cannot serve {what}{where}: {lines} "
                           "(choose another --serve/--gpu, or --serve any to skip the check)")


def vllm_kernel(ls: LayerScheme | None, profile: ServeProfile) -> KernelChoice:
    """The vLLM scheme class that serves ``ls`` under ``profile`` (``_get_scheme_from_parts`` order)."""
    if ls is None or not ls.is_quantized:
        return KernelChoice("UnquantizedLinearMethod (BF16/FP16 GEMM)")
    view = PlanView(OrderedDict([("layer", ls)]), [], None)
    vllm = ServeProfile("vllm", profile.gpu, profile.tp, profile.allow_optional_kernels)
    for rule in rules_for(vllm):
        found = rule.check(view, vllm)
        if found:
            return KernelChoice(None, found[0][1])
    w, a = ls.weights, ls.activations
    if w.dtype == "fp8":
        return KernelChoice("CompressedTensorsW8A8Fp8" if a is not None else "CompressedTensorsW8A16Fp8")
    if a is None:
        return KernelChoice("CompressedTensorsWNA16 (Marlin)")
    if isinstance(w.granularity, PerGroup) or not (
            (isinstance(a.granularity, PerTensor) and not a.dynamic) or isinstance(a.granularity, PerToken)):
        return KernelChoice("CompressedTensorsWNA8Int (Humming, optional)", format="pack-quantized", optional=True)
    return KernelChoice("CompressedTensorsW8A8Int8 (" + ("static per-tensor" if not a.dynamic else "dynamic per-token")
                        + " activations)")
