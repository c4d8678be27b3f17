"""``export_checkpoint``: save a model quantized by ``qdoctor.quantize`` as a compressed-tensors
checkpoint — safetensors shards + ``config.json`` with a ``quantization_config`` — that
``transformers.AutoModelForCausalLM.from_pretrained`` and vLLM load.

The steps are llm-compressor's save path, without llm-compressor:

1. read the plan off the model: each ``QuantLinear``'s ``LayerScheme``, each untouched
   ``nn.Linear`` (``ctconfig.plan_export`` groups them into config groups);
2. rebuild the model class from its config on the meta device and load the model's state
   dict into it — tensors are shared, not copied (a GGUF-loaded model cannot
   ``save_pretrained`` itself);
3. per quantized layer, give ``{weight, weight_scale[, input_scale]}`` (qdoctor's own fp32
   scales) to the compressed-tensors compressor of the group's format
   (``BaseCompressor.compress``: int8/fp8 codes, or int8 packed into int32 for weight-only
   INT8) and check that decompressing returns qdoctor's dequantized weight ŵ bit for bit;
4. ``save_pretrained`` into a staging directory, ``ModelCompressor.update_config`` adds the
   ``quantization_config``; tokenizer, generation config, model card; rename into place.

Dtypes: scales are stored in fp32 (qdoctor computes them in fp32; vLLM reads them in fp32).
Kept layers are stored in their kept dtype (bf16/fp16/fp32); every other unquantized tensor
(embeddings, norms, ``lm_head``, biases) in the checkpoint dtype — by default the model's.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from qdoctor.errors import QDoctorError
from qdoctor.export.ctconfig import ExportPlan, dtype_name, plan_export, resolve_dtype
from qdoctor.quant.granularity import PerGroup
from qdoctor.quant.linear import KEEP_TORCH_DTYPE, QuantLinear
from qdoctor.quant.spec import LayerScheme

REPORT_FILE = "qdoctor_export.json"


@dataclass
class ExportReport:
    """What was written, and how it compares with an unquantized checkpoint."""

    out_dir: str
    format: str  # top-level compressed-tensors format (int-quantized, …, mixed-precision)
    checkpoint_dtype: str
    groups: list[dict]
    unquantized: dict[str, str]  # layer → why it is stored in floating point
    warnings: list[str] = field(default_factory=list)
    vllm_issues: list[str] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)  # file name → bytes
    total_bytes: int = 0
    weights_bytes: int = 0  # safetensors files only
    fp32_bytes: int = 0  # the same tensors unquantized in fp32 (computed, not written)
    bf16_bytes: int = 0  # … in bf16
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def summary_lines(self) -> list[str]:
        mb = 1024 * 1024
        lines = [f"wrote {self.out_dir} ({self.format}, unquantized tensors in {self.checkpoint_dtype}) "
                 f"in {self.seconds:.1f}s",
                 f"size {self.total_bytes / mb:.1f} MiB (weights {self.weights_bytes / mb:.1f} MiB) vs "
                 f"{self.fp32_bytes / mb:.1f} MiB fp32 ({self.weights_bytes / max(self.fp32_bytes, 1):.1%}) and "
                 f"{self.bf16_bytes / mb:.1f} MiB bf16 ({self.weights_bytes / max(self.bf16_bytes, 1):.1%})"]
        for g in self.groups:
            lines.append(f"  {g['name']}: {g['scheme']} · {g['n_layers']} layers · {g['format']} · "
                         f"vLLM: {g['vllm']}")
        if self.unquantized:
            shown = ", ".join(f"{k} ({v})" for k, v in list(self.unquantized.items())[:6])
            more = " …" if len(self.unquantized) > 6 else ""
            lines.append(f"  unquantized: {len(self.unquantized)} layer(s): {shown}{more}")
        lines += [f"  warning: {w}" for w in self.warnings]
        return lines


def export_checkpoint(model, tokenizer, out_dir, *, overwrite: bool = False, card: dict | None = None,
                      dtype: "str | torch.dtype | None" = None, require_vllm: bool = False,
                      max_shard_size: "int | str" = "2GB", progress: bool = True) -> ExportReport:
    """Write ``model`` (quantized in place by ``qdoctor.quantize``) to ``out_dir``.

    tokenizer: saved beside the weights (None: no tokenizer files).
    overwrite: replace an existing checkpoint directory (refused otherwise).
    card: evidence and measured numbers for the model card (``export.card``); printed as given.
    dtype: checkpoint dtype of unquantized tensors (fp32/bf16/fp16; default: the model's).
    require_vllm: refuse plans that vLLM has no kernel for (per-group INT8 W8A8, …).
    max_shard_size: safetensors shard size, as ``save_pretrained`` takes it.

    Raises ``QDoctorError`` — before anything is written — for an existing ``out_dir``, an
    unwritable parent, a model that is not quantized, or a plan the format cannot express.
    """
    from qdoctor.export.staging import check_out_dir, staged_dir

    t0 = time.perf_counter()
    check_out_dir(out_dir, overwrite)
    plan = plan_for_model(model, dtype)
    require_vllm_servable(plan, require_vllm)
    with staged_dir(out_dir, overwrite) as tmp:
        skeleton = build_compressed_model(model, plan, progress=progress)
        _save(skeleton, plan, tokenizer, tmp, max_shard_size)
        report = write_report(model, plan, tmp, out_dir, card, t0)
    return report


def require_vllm_servable(plan: ExportPlan, require_vllm: bool) -> list[str]:
    """The plan's vLLM issues; with ``require_vllm`` any issue is an error."""
    issues = plan.vllm_issues()
    if require_vllm and issues:
        more = f" (+{len(issues) - 1} more)" if len(issues) > 1 else ""
        raise QDoctorError(f"vLLM cannot serve this plan: {issues[0]}{more}")
    return issues


def write_report(model, plan: ExportPlan, tmp: Path, out_dir, card: dict | None, t0: float) -> ExportReport:
    """The export report of the checkpoint staged in ``tmp``; writes the model card (README.md)
    and the provenance file beside the weights."""
    from qdoctor.export.card import render_card

    report = ExportReport(
        out_dir=str(Path(out_dir).expanduser()), format=str(plan.config.format),
        checkpoint_dtype=dtype_name(plan.dtype), groups=[g.to_dict() for g in plan.groups],
        unquantized=dict(plan.unquantized), warnings=list(plan.warnings), vllm_issues=plan.vllm_issues())
    fp_numel = _unique_numel(model)
    report.fp32_bytes, report.bf16_bytes = 4 * fp_numel, 2 * fp_numel
    report.weights_bytes = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
    source = getattr(model, "qdoctor_source", None) or getattr(model.config, "_name_or_path", "") or ""
    (tmp / "README.md").write_text(render_card(plan, report, card, source=str(source)), encoding="utf-8")
    report.seconds = time.perf_counter() - t0
    report.files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
    provenance = {"qdoctor_version": _version(), "source": str(source), "report": report.to_dict(),
                  "card": card or {}}
    (tmp / REPORT_FILE).write_text(json.dumps(provenance, indent=2, default=str) + "\n", encoding="utf-8")
    report.files[REPORT_FILE] = (tmp / REPORT_FILE).stat().st_size
    report.total_bytes = sum(report.files.values())
    return report


def layer_plan(model: nn.Module) -> "OrderedDict[str, LayerScheme | None]":
    """Every linear-like layer in module order → its applied ``LayerScheme`` (None: untouched).

    Linear-like = ``nn.Linear``, ``QuantLinear``, and modules vLLM builds as linear layers
    (MoE routers/gates; compressed-tensors' ``get_vllm_module_type``)."""
    from compressed_tensors.quantization.quant_config import get_vllm_module_type

    out: "OrderedDict[str, LayerScheme | None]" = OrderedDict()
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            out[name] = m.scheme
        elif isinstance(m, nn.Linear) or (name and get_vllm_module_type(type(m).__name__) == "Linear"
                                           and getattr(m, "weight", None) is not None):
            out[name] = None
    return out


def plan_for_model(model: nn.Module, dtype=None) -> ExportPlan:
    """The export plan of a quantized model (no I/O). Raises ``QDoctorError`` if unsupported."""
    if not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        raise QDoctorError("export needs a transformers model (with .config and save_pretrained)")
    layers = layer_plan(model)
    if not any(ls is not None for ls in layers.values()):
        raise QDoctorError("model is not quantized: call qdoctor.quantize(model, scheme) before exporting")
    return plan_for_layers(model, layers, _model_dtype(model), dtype)


def plan_for_layers(model: nn.Module, layers: "OrderedDict[str, LayerScheme | None]", model_dtype: torch.dtype,
                    dtype=None) -> ExportPlan:
    """The export plan of ``layers`` (every linear-like layer → its ``LayerScheme`` or None) of
    ``model``, whose unquantized tensors are in ``model_dtype``."""
    ckpt_dtype = resolve_dtype(dtype) if dtype is not None else model_dtype
    # Fused MoE experts (3-D weights) are matmuls that are not linear layers: a class target
    # ("Linear") would mean different things to transformers and vLLM there, so use names.
    class_ok = not any(p.dim() >= 3 for p in model.parameters())
    renamed = {n: c for n, c in zip(layers, checkpoint_names(model, list(layers))) if c != n}
    quantized_renamed = [n for n in renamed if layers[n] is not None and layers[n].is_quantized]
    if quantized_renamed:
        first = quantized_renamed[0]
        raise QDoctorError(f"cannot export: transformers stores {first} as {renamed[first]} in checkpoints, "
                           "and compressed-tensors targets cannot name both")
    class_ok = class_ok and not renamed  # an ignore entry must name the same module for both loaders
    # Unquantized layers are listed under their checkpoint names, as llm-compressor does
    # (vLLM matches checkpoint names; transformers never quantizes a layer no target selects).
    layers = OrderedDict((renamed.get(n, n), ls) for n, ls in layers.items())
    reasons = {n: "ignored by the scheme" for n, ls in layers.items() if ls is None}
    plan = plan_export(layers, reasons, ckpt_dtype, class_target_ok=class_ok)
    if ckpt_dtype != torch.float32:
        plan.warnings.append(f"in a {dtype_name(ckpt_dtype)} checkpoint transformers casts the fp32 scales to "
                             f"{dtype_name(ckpt_dtype)} on load (its scale parameters take the model dtype); "
                             "vLLM reads them in fp32")
    if not class_ok:
        plan.warnings.append("the model has fused MoE experts (3-D weights) that qdoctor leaves unquantized: "
                             "transformers 5.23 fails to load such compressed-tensors checkpoints (its loader "
                             "routes the experts through the dequantizer and finds no tensors); not tested in vLLM")
    return plan


def checkpoint_names(model: nn.Module, names: list[str]) -> list[str]:
    """Module names as the checkpoint spells them (transformers 5 may rename weights on load,
    e.g. Mixtral's ``mlp.gate`` is ``block_sparse_moe.gate`` on disk)."""
    try:
        from compressed_tensors.quantization.quant_config import _map_to_checkpoint_names
    except ImportError:  # older compressed-tensors: no renaming support
        return list(names)
    return _map_to_checkpoint_names(model, list(names))


def ct_weight_scale(ql: QuantLinear) -> torch.Tensor:
    """qdoctor's weight scale in compressed-tensors' shape: tensor (1,), channel (N, 1), group (N, K/g)."""
    s = ql.weight_scale.detach().float()
    if isinstance(ql.scheme.weights.granularity, PerGroup):
        return s.squeeze(-1).contiguous()
    return s.reshape(1) if s.dim() == 0 else s.contiguous()


def compress_layer(ql: QuantLinear, ct_scheme, bias_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The layer's checkpoint tensors (local names) from the compressed-tensors compressor of its format.

    Checks that decompressing them returns ŵ (``ql.dequantized_weight()``) exactly: the checkpoint holds
    qdoctor's codes and scales, not a re-quantization."""
    from compressed_tensors.compressors import BaseCompressor

    compressor = BaseCompressor.get_value_from_registry(_fmt(ct_scheme.format))
    state = {"weight": ql.weight.detach().float(), "weight_scale": ct_weight_scale(ql)}
    if ql.input_scale is not None:
        state["input_scale"] = ql.input_scale.detach().float().reshape(1)
    packed = compressor.compress(state, ct_scheme)
    del state
    restored = compressor.decompress(dict(packed), ct_scheme)["weight"]
    w_hat = ql.dequantized_weight()  # not cached on the layer: one layer's fp32 copy at a time
    if restored.shape != w_hat.shape:
        raise RuntimeError(f"{ql.name}: compressed-tensors returned shape {tuple(restored.shape)}")
    if not torch.equal(restored.float(), w_hat):
        diff = (restored.float() - w_hat).abs().max().item()
        raise RuntimeError(f"{ql.name}: compressed-tensors round trip differs from qdoctor's weights (max {diff})")
    if ql.bias is not None:
        packed["bias"] = ql.bias.detach().to(bias_dtype or ql.bias.dtype)
    return packed


def kept_layer_tensors(ql: QuantLinear) -> dict[str, torch.Tensor]:
    """A kept (unquantized) layer's checkpoint tensors (local names), in its kept dtype."""
    kd = KEEP_TORCH_DTYPE[ql.scheme.keep]
    out = {"weight": ql.weight.detach().to(kd)}
    if ql.bias is not None:
        out["bias"] = ql.bias.detach().to(kd)
    return out


def build_compressed_model(model: nn.Module, plan: ExportPlan, progress: bool = True) -> nn.Module:
    """A fresh instance of the model's class holding the checkpoint tensors (meta-initialized,
    tensors shared with ``model`` where unchanged)."""
    from compressed_tensors.utils import replace_direct_state_dict

    config = copy.deepcopy(model.config)
    config.dtype = plan.dtype
    cast: dict[int, torch.Tensor] = {}  # keeps tied tensors tied after the cast

    def to_ckpt(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        key = id(t)
        if key not in cast:
            cast[key] = t.detach().to(dtype) if t.is_floating_point() else t.detach()
        return cast[key]

    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.scheme.is_quantized}
    replaced = {f"{n}.weight" for n in quantized}  # swapped for codes below: no cast needed
    state = OrderedDict((k, v.detach() if k in replaced else to_ckpt(v, plan.dtype))
                        for k, v in model.state_dict(keep_vars=True).items())
    kept = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and not m.scheme.is_quantized}
    for n, m in kept.items():
        state.update({f"{n}.{k}": t for k, t in kept_layer_tensors(m).items()})
    _untie_quantized(model, config, quantized, plan)
    with torch.device("meta"), _quiet("transformers"):
        skeleton = type(model)(config)
    missing, unexpected = skeleton.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not _tied_key(skeleton, k)]
    if missing or unexpected:
        raise QDoctorError(f"cannot rebuild {type(model).__name__} from its config: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    if getattr(model, "generation_config", None) is not None:
        skeleton.generation_config = copy.deepcopy(model.generation_config)
    group_of = plan.group_of()
    for n, ql in tqdm(quantized.items(), desc="compressing", unit="layer", leave=False, disable=not progress):
        replace_direct_state_dict(skeleton.get_submodule(n), compress_layer(ql, group_of[n].ct_scheme, plan.dtype))
    check_targets(skeleton, plan)
    return skeleton.eval()


def check_targets(skeleton: nn.Module, plan: ExportPlan) -> None:
    """Run compressed-tensors' own matcher on the rebuilt model: every quantized layer must
    resolve to its group, and nothing else may match any target."""
    from compressed_tensors.utils.match import match_named_modules, match_targets

    config = plan.config
    target_group = {t: name for name, s in config.config_groups.items() for t in s.targets}
    got = {}
    for name, module in match_named_modules(skeleton, list(target_group), config.ignore):
        got[name] = target_group[match_targets(name, module, list(target_group))[0]]
    expected = {layer: g.name for g in plan.groups for layer in g.layers}
    if got != expected:
        wrong = sorted(set(got.items()) ^ set(expected.items()))[:3]
        raise RuntimeError(f"config targets do not select the planned layers (e.g. {wrong})")


def _save(skeleton: nn.Module, plan: ExportPlan, tokenizer, out: Path, max_shard_size) -> None:
    from compressed_tensors.compressors import ModelCompressor

    skeleton.save_pretrained(out, max_shard_size=max_shard_size, safe_serialization=True)
    ModelCompressor(quantization_config=plan.config).update_config(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def _untie_quantized(model, config, quantized: dict, plan: ExportPlan) -> None:
    """A quantized layer whose fp weight is shared (tied ``lm_head``/embeddings) cannot stay
    tied: the embedding keeps floating point, the layer is stored as codes."""
    shared = {}
    for k, v in model.state_dict(keep_vars=True).items():
        shared.setdefault(id(v), []).append(k)
    tied = [n for n, m in quantized.items() if len(shared.get(id(m.weight), [])) > 1]
    if tied:
        for cfg in (config, getattr(config, "text_config", None)):
            if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
                cfg.tie_word_embeddings = False
        plan.warnings.append(f"{', '.join(tied)} shared its weight with another tensor (tied embeddings); "
                             "the checkpoint stores them untied (tie_word_embeddings=false)")


def _tied_key(model: nn.Module, key: str) -> bool:
    """A missing key that is a tied alias (e.g. lm_head.weight ↔ embed_tokens.weight) is fine."""
    try:
        p = model.get_parameter(key)
    except AttributeError:
        return False
    return p.device.type != "meta"


@contextmanager
def _quiet(logger_name: str):
    log = logging.getLogger(logger_name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _unique_numel(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _fmt(fmt) -> str:
    return getattr(fmt, "value", fmt)


def _version() -> str:
    from qdoctor import __version__

    return __version__
