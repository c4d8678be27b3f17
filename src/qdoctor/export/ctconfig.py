"""qdoctor layer schemes → a compressed-tensors ``QuantizationConfig`` (pure mapping, no I/O).

One ``QuantSpec`` becomes one ``compressed_tensors.QuantizationArgs``:

    dtype       int8 → type=int, num_bits=8        fp8 → type=float, num_bits=8 (E4M3)
    granularity tensor / channel / token / group:g → strategy tensor / channel / token / group (group_size=g)
    dynamic     activations as in the spec (static per-tensor scales are stored as ``input_scale``)
    symmetric   always (qdoctor has no zero points)
    observer    informational, llm-compressor's names: weights ``memoryless_minmax`` (absmax of the
                live tensor) or, for the ``mse`` clip search, ``memoryless_mse``; static absmax
                activations ``static_minmax`` (max over every calibration token); left unset for
                dynamic activations and for the percentile and mse activation observers, which
                have no llm-compressor equivalent (its ``mse`` is a moving average over batches).

Layers with an identical ``LayerScheme`` form one config group. Targets follow the matching
rules of both loaders — compressed-tensors (``utils.match``) and vLLM
(``compressed_tensors/utils.py: find_matched_target``): an exact module name, ``re:<regex>``
(``re.match``, i.e. anchored at the start; we also anchor the end with ``$``) or a class name.
Their precedence differs (compressed-tensors: exact names, then regexes sorted alphabetically,
then class names; vLLM: the first name/regex in config order, then class names, then fused
shards), so we only ever write targets that match **disjoint** sets of layers:

- one group covering every quantized layer → ``targets: ["Linear"]`` plus an ``ignore`` list of
  every other linear layer (exactly what llm-compressor writes for a uniform scheme);
- several groups → names only, compacted into regexes per (block prefix, layer suffix),
  e.g. ``re:model\\.layers\\.\\d+\\.self_attn\\.(?:q_proj|k_proj|v_proj)$`` or an explicit index
  alternation ``(?:0|1|7)`` when a group holds only some blocks. Class targets are avoided
  because vLLM matches a fused ``qkv_proj`` by its class (``QKVParallelLinear`` contains
  ``Linear``) before it looks at the shard names.

Layers left in floating point (kept bf16/fp16/fp32, or untouched by the scheme such as
``lm_head``) are listed by exact name in ``ignore``.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from qdoctor.errors import QDoctorError
from qdoctor.quant.granularity import PerChannel, PerGroup, PerTensor, PerToken
from qdoctor.quant.spec import LayerScheme, QuantSpec
from qdoctor.serve.profiles import FUSED_SHARDS, ServeProfile, vllm_kernel

_STRATEGY = {PerTensor: "tensor", PerChannel: "channel", PerToken: "token", PerGroup: "group"}
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}
_WEIGHT_OBSERVER_NAMES = {"absmax": "memoryless_minmax", "mse": "memoryless_mse"}  # llm-compressor's names
_INDEXED = re.compile(r"^(?P<prefix>.*?\.)(?P<idx>\d+)(?P<suffix>\..+)$")


def quantization_args(spec: QuantSpec, *, weights: bool):
    """The ``QuantizationArgs`` of one qdoctor ``QuantSpec`` (see the module docstring)."""
    from compressed_tensors.quantization import QuantizationArgs

    g = spec.granularity
    kwargs = dict(num_bits=8, type="int" if spec.dtype == "int8" else "float", symmetric=True,
                  strategy=_STRATEGY[type(g)], dynamic=False if weights else bool(spec.dynamic))
    if isinstance(g, PerGroup):
        kwargs["group_size"] = int(g.group_size)
    if weights:
        kwargs["observer"] = _WEIGHT_OBSERVER_NAMES[spec.observer]
    elif not spec.dynamic and spec.observer == "absmax":
        kwargs["observer"] = "static_minmax"
    try:
        return QuantizationArgs(**kwargs)
    except ValueError as e:  # pydantic validation: a combination compressed-tensors cannot hold
        raise QDoctorError(f"compressed-tensors cannot express {spec.to_dict()}: {_first_line(e)}") from None


def quantization_scheme(ls: LayerScheme, targets: list[str], format: str | None = None):
    """The ``QuantizationScheme`` of a quantized ``LayerScheme``, with its storage format set the
    way compressed-tensors infers it (int-quantized, float-quantized, pack-quantized or naive-quantized)."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationScheme

    if not ls.is_quantized:
        raise QDoctorError(f"a kept layer ({ls.describe()}) has no quantization scheme; it goes in 'ignore'")
    try:
        scheme = QuantizationScheme(
            targets=list(targets), weights=quantization_args(ls.weights, weights=True),
            input_activations=quantization_args(ls.activations, weights=False) if ls.activations else None)
    except ValueError as e:
        raise QDoctorError(f"compressed-tensors cannot express {ls.describe()}: {_first_line(e)}") from None
    # ``format``: a runtime's need over the inferred one (vLLM's Humming kernel reads pack-quantized INT8 W8A8)
    scheme.format = format or infer_module_format(torch.nn.Linear, scheme)
    return scheme


def vllm_issue(ls: LayerScheme, profile: ServeProfile | None = None) -> str | None:
    """Why vLLM has no kernel for a layer scheme under ``profile`` (default: Hopper, tp 1, no
    optional kernels); None when it has one. The rules are ``serve.profiles.RULES``."""
    return vllm_kernel(ls, profile or ServeProfile()).why_not or None


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES:
            raise QDoctorError(f"cannot save unquantized tensors as {dtype}; use fp32, bf16 or fp16")
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise QDoctorError(f"unknown checkpoint dtype {dtype!r}; use fp32, bf16 or fp16") from None


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def check_kept_dtypes(kept: dict[str, str], checkpoint_dtype: torch.dtype) -> None:
    """A checkpoint has one dtype for everything unquantized: loaders (transformers, vLLM) cast
    each stored tensor to it. A kept layer's values survive that cast only when the checkpoint
    dtype holds its dtype exactly: fp32 holds bf16 and fp16; bf16 and fp16 hold only themselves
    (fp16 → bf16 drops 3 mantissa bits; bf16 → fp16 can overflow above 65504)."""
    ck = dtype_name(checkpoint_dtype)
    for name, keep in kept.items():
        if keep == ck or (ck == "fp32" and keep in ("bf16", "fp16")):
            continue
        if keep == "fp32":
            why = f"loaders would run it in {ck}"
        else:
            why = f"loaders cast every unquantized tensor to the checkpoint dtype and {keep} → {ck} is not exact"
        raise QDoctorError(f"cannot export: {name} is kept in {keep} but the checkpoint dtype is {ck} ({why}); "
                           f"save with dtype fp32 (--save-dtype fp32) or keep it in {ck}")


@dataclass
class ExportGroup:
    """One compressed-tensors config group: layers sharing one ``LayerScheme``."""

    name: str
    scheme: LayerScheme
    layers: list[str]
    targets: list[str]
    ct_scheme: object  # compressed_tensors.QuantizationScheme

    @property
    def format(self) -> str:
        return _format_value(self.ct_scheme.format)

    @property
    def vllm_issue(self) -> str | None:
        return vllm_issue(self.scheme)

    def to_dict(self) -> dict:
        return {"name": self.name, "scheme": self.scheme.describe(), "layer_scheme": self.scheme.to_dict(),
                "format": self.format, "targets": list(self.targets), "n_layers": len(self.layers),
                "layers": list(self.layers), "vllm": self.vllm_issue or "supported"}


@dataclass
class ExportPlan:
    """What the checkpoint will say: config groups, unquantized layers (and why), dtype."""

    groups: list[ExportGroup]
    unquantized: dict[str, str]  # layer → reason it stays in floating point
    kept: dict[str, str]  # layer → keep dtype (a subset of ``unquantized``)
    dtype: torch.dtype  # checkpoint dtype of every unquantized tensor except kept layers
    config: object  # compressed_tensors.QuantizationConfig
    warnings: list[str] = field(default_factory=list)

    def group_of(self) -> dict[str, ExportGroup]:
        return {layer: g for g in self.groups for layer in g.layers}

    def vllm_issues(self) -> list[str]:
        """Reasons vLLM would refuse or mis-serve this checkpoint (empty: it should load)."""
        out = [f"{g.name} ({g.scheme.describe()}, {len(g.layers)} layers): {g.vllm_issue}"
               for g in self.groups if g.vllm_issue]
        return out + [w for w in self.warnings if w.startswith("vLLM fuses")]


def plan_export(layers: "OrderedDict[str, LayerScheme | None]", ignored_reason: dict[str, str] | None = None,
                checkpoint_dtype: torch.dtype = torch.float32, class_target_ok: bool = True,
                format_of=None) -> ExportPlan:
    """Build the config for the model's linear layers.

    layers: every linear-like layer in module order → its applied ``LayerScheme`` (None: left
        untouched by the scheme, e.g. ``lm_head``).
    ignored_reason: optional reason per untouched layer (default "not quantized by the scheme").
    class_target_ok: allow ``targets: ["Linear"]`` for a single group (False for models whose
        matmul weights are not all linear layers, e.g. fused MoE experts).
    format_of: optional ``LayerScheme -> format | None``: the storage format a runtime needs for a
        group when it is not the one compressed-tensors infers (``serve.profiles.vllm_kernel``).
    """
    from compressed_tensors.quantization import QuantizationConfig

    ignored_reason = ignored_reason or {}
    by_scheme: "OrderedDict[LayerScheme, list[str]]" = OrderedDict()
    unquantized: dict[str, str] = {}
    kept: dict[str, str] = {}
    for name, ls in layers.items():
        if ls is None:
            unquantized[name] = ignored_reason.get(name, "not quantized by the scheme")
        elif not ls.is_quantized:
            kept[name] = ls.keep
            unquantized[name] = f"kept in {ls.keep} by the plan"
        else:
            by_scheme.setdefault(ls, []).append(name)
    if not by_scheme:
        raise QDoctorError("nothing to export in compressed-tensors form: no layer is quantized "
                           "(every linear layer is kept or ignored)")
    check_kept_dtypes(kept, checkpoint_dtype)
    universe = list(layers)
    single = len(by_scheme) == 1 and class_target_ok
    groups = []
    for i, (ls, names) in enumerate(by_scheme.items()):
        targets = ["Linear"] if single else compact_targets(names, universe)
        fmt = format_of(ls) if format_of is not None else None
        groups.append(ExportGroup(f"group_{i}", ls, names, targets, quantization_scheme(ls, targets, fmt)))
    formats = {g.format for g in groups}
    config = QuantizationConfig(
        config_groups={g.name: g.ct_scheme for g in groups},
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed",
        ignore=list(unquantized),
    )
    plan = ExportPlan(groups, unquantized, kept, checkpoint_dtype, config)
    plan.warnings.extend(fused_shard_warnings(layers))
    if kept and dtype_name(checkpoint_dtype) == "fp32":
        plan.warnings.append(
            f"{len(kept)} kept layer(s) are stored in their kept dtype ({', '.join(sorted(set(kept.values())))}) "
            "inside an fp32 checkpoint: loaders run them in fp32 with those exact weights, while qdoctor's "
            "simulation also rounds their inputs/outputs to the kept dtype")
    return plan


def compact_targets(names: list[str], universe: list[str]) -> list[str]:
    """Targets matching exactly ``names`` among ``universe`` (all linear layers).

    Names of the form ``<prefix><index>.<parent>.<leaf>`` (``model.layers.`` 12 ``.mlp.down_proj``)
    are bucketed by prefix, index set and parent; an index set covering every block that has
    the layer becomes ``\\d+``. Names without an index stay exact, as does a bucket of one name.
    The result is checked against ``universe``: it selects ``names`` and nothing else."""
    chosen = set(names)
    all_idx: dict[tuple[str, str], set[int]] = {}
    for n in universe:
        m = _INDEXED.match(n)
        if m:
            all_idx.setdefault((m["prefix"], m["suffix"]), set()).add(int(m["idx"]))
    mine: "OrderedDict[tuple[str, str], list[int]]" = OrderedDict()
    exact: list[str] = []
    for n in names:
        m = _INDEXED.match(n)
        if m:
            mine.setdefault((m["prefix"], m["suffix"]), []).append(int(m["idx"]))
        else:
            exact.append(n)
    # (prefix, index pattern, parent) → the leaves sharing them
    buckets: "OrderedDict[tuple[str, str, str], list[str]]" = OrderedDict()
    for (prefix, suffix), idx in mine.items():
        idx_set = sorted(set(idx))
        if len(idx_set) > 1 and set(idx_set) == all_idx[(prefix, suffix)]:
            pattern = r"\d+"
        elif len(idx_set) == 1:
            pattern = str(idx_set[0])
        else:
            pattern = "(?:" + "|".join(str(i) for i in idx_set) + ")"
        parent, _, leaf = suffix.rpartition(".")
        buckets.setdefault((prefix, pattern, parent), []).append(leaf)
    targets = []
    for (prefix, pattern, parent), leaves in buckets.items():
        if len(leaves) == 1 and pattern.isdigit():
            targets.append(f"{prefix}{pattern}{parent}.{leaves[0]}")
            continue
        tail = re.escape(leaves[0]) if len(leaves) == 1 else "(?:" + "|".join(re.escape(x) for x in leaves) + ")"
        targets.append("re:" + re.escape(prefix) + pattern + re.escape(parent + ".") + tail + "$")
    targets += exact
    matched = {u for u in universe if any(_match(u, t) for t in targets)}
    if matched != chosen:  # defensive: never write a target that catches another group's layer
        return list(names)
    return targets


def _match(name: str, target: str) -> bool:
    from compressed_tensors.utils.match import match_name

    return match_name(name, target)


def fused_shard_warnings(layers: "OrderedDict[str, LayerScheme | None]") -> list[str]:
    """vLLM serves q/k/v and gate/up of a block as one GEMM: their schemes must agree."""
    shard_to_fused = {s: fused for fused, shards in FUSED_SHARDS.items() for s in shards}
    seen: "OrderedDict[tuple[str, str], dict[str, str]]" = OrderedDict()
    for name, ls in layers.items():
        parent, _, leaf = name.rpartition(".")
        if leaf in shard_to_fused:
            label = "unquantized" if ls is None else ls.describe()
            seen.setdefault((parent, shard_to_fused[leaf]), {})[leaf] = label
    out = []
    for (parent, fused), labels in seen.items():
        if len(set(labels.values())) > 1:
            detail = ", ".join(f"{k}: {v}" for k, v in labels.items())
            out.append(f"vLLM fuses {parent}.{fused} = {'+'.join(FUSED_SHARDS[fused])} into one GEMM and needs one "
                       f"scheme for all of them ({detail})")
    return out


def _format_value(fmt) -> str:
    return getattr(fmt, "value", fmt) or "dense"


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    # pydantic: "1 validation error for X\n<field>\n  Value error, <message> [...]"
    msg = lines[-1] if lines else type(e).__name__
    return re.sub(r"\s*\[type=.*$", "", msg.replace("Value error, ", ""))
