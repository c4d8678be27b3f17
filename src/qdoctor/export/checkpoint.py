"""``export_checkpoint``: a model and its plan → a compressed-tensors checkpoint — safetensors
shards + ``config.json`` with a ``quantization_config`` — that
``transformers.AutoModelForCausalLM.from_pretrained`` and vLLM load.

One path, block by block, whatever the model's residency (``models.streaming``):

1. plan: every linear-like layer's ``LayerScheme`` — read off a model already quantized by
   ``qdoctor.quantize`` (its ``QuantLinear``s), or resolved from the recipe's scheme without
   touching a weight (``planned_layers``); ``ctconfig.plan_export`` groups them into config
   groups and every refusal happens here, before anything is written;
2. per decoder block (opened by the pipeline; treated by the recipe when one is given, and
   put back afterwards): each quantized layer's ``{weight, weight_scale[, input_scale]}``
   (qdoctor's own fp32 scales) goes through the compressed-tensors compressor of its group's
   format (``BaseCompressor.compress``: int8/fp8 codes, or int8 packed into int32 for
   weight-only INT8), checked to decompress to qdoctor's ŵ bit for bit; kept layers in their
   kept dtype; norms in the checkpoint dtype; transformers' own save-time renaming
   (``revert_weight_conversion``) applied; the shard writer flushes at ``max_shard_size``;
3. the tensors outside the blocks (embeddings, final norm, LM head) the same way, a tied alias
   stored once; then config.json (``ModelCompressor.update_config`` adds the
   ``quantization_config``), generation config, tokenizer, model card, report — all in a
   staging directory renamed into place at the end.

Memory: one block plus the resident non-block tensors and at most one shard in flight.
Dtypes: scales are stored in fp32 (qdoctor computes them in fp32; vLLM reads them in fp32).
Kept layers are stored in their kept dtype (bf16/fp16/fp32); every other unquantized tensor
(embeddings, norms, ``lm_head``, biases) in the checkpoint dtype — by default the model's.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import time
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file
from tqdm.auto import tqdm

from qdoctor.errors import QDoctorError
from qdoctor.export.card import render_card
from qdoctor.export.ctconfig import ExportPlan, dtype_name, plan_export, resolve_dtype
from qdoctor.export.staging import check_out_dir, staged_dir
from qdoctor.export.transforms import online_transforms, transform_config, transform_tensors
from qdoctor.export.verify import Verification, VerifySpec, verify_checkpoint
from qdoctor.models.registry import arch_for, get_blocks
from qdoctor.models.streaming import materialized
from qdoctor.quant.apply import layer_scheme_for, restore
from qdoctor.quant.granularity import PerGroup
from qdoctor.quant.linear import KEEP_TORCH_DTYPE, QuantLinear
from qdoctor.quant.spec import LayerScheme
from qdoctor.serve.profiles import (
    GPU_CAPABILITY,
    PlanView,
    ServeProfile,
    check_view,
    model_fused_groups,
    refuse,
    vllm_kernel,
)

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
    serve: dict | None = None  # the profile the plan was checked against (None: not checked)
    serving: dict = field(default_factory=dict)  # vLLM per GPU: violations; kernel per group
    verification: dict | None = None  # Verification.to_dict(), or {"skipped": why}
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
        if self.verification and "skipped" not in self.verification:
            v = self.verification
            lines.append(f"  verified: reloaded PPL {v['reloaded_ppl']:.4f} vs simulated under the loader's rule "
                         f"{v['loader_rule_ppl']:.4f} ({v['gap_pct']:+.3f}%, limit ±{v['tolerance_pct']}%); qdoctor's "
                         f"own rounding {v['simulated_ppl']:.4f} ({v['rounding_gap_pct']:+.3f}%)")
        elif self.verification:
            lines.append(f"  not verified: {self.verification['skipped']}")
        lines += [f"  warning: {w}" for w in self.warnings]
        return lines


def export_checkpoint(model, tokenizer, out_dir, *, recipe=None, stats=None, overwrite: bool = False,
                      card: dict | None = None, dtype: "str | torch.dtype | None" = None, require_vllm: bool = False,
                      max_shard_size: "int | str | None" = "2GB", progress: bool = True,
                      serve: "ServeProfile | str | None" = None, verify: VerifySpec | None = None) -> ExportReport:
    """Write ``model`` with its plan to ``out_dir`` (see the module docstring).

    recipe: a ``policy.recipe.Recipe`` (or anything with ``scheme``, ``apply_block`` and
        ``apply_rest``; with ``gptq`` set, ``gptq_weights``) applied block by block as the checkpoint is written — needed for a
        block-streamed model; a model in memory is left as it was. None: ``model`` is already
        quantized by ``qdoctor.quantize`` and is written as it is.
    stats: the recipe's ``CalibrationStats`` (static activation scales, smoothing).
    tokenizer: saved beside the weights (None: no tokenizer files).
    overwrite: replace an existing checkpoint directory (refused otherwise).
    card: evidence and measured numbers for the model card (``export.card``); printed as given.
    dtype: checkpoint dtype of unquantized tensors (fp32/bf16/fp16; default: the model's).
    require_vllm: refuse plans that vLLM has no kernel for (per-group INT8 W8A8, …): the same as
        ``serve="vllm"`` (kept as an alias).
    serve: the runtime profile (``serve.profiles.ServeProfile`` or a runtime name) the plan must
        run on: every violation is listed in one ``QDoctorError`` before anything is written, and
        layer groups get the storage format that runtime's kernel reads (vLLM's optional Humming
        kernel: ``pack-quantized``). None: no check (the report and card still say what vLLM runs).
    verify: reload the written checkpoint with transformers and compare its perplexity on
        ``verify.windows`` with qdoctor's simulation of the plan, in the staging directory before
        it is published (``export.verify``); a gap above ``verify.tolerance_pct`` fails the export
        and leaves nothing at ``out_dir``. Needs the model in memory (not block-streamed).
    max_shard_size: safetensors shard size, as ``save_pretrained`` takes it; None: one shard per
        decoder block plus one for the rest.

    Raises ``QDoctorError`` — before anything is written — for an existing ``out_dir``, an
    unwritable parent, a model that is not quantized (and no recipe), a plan that needs
    statistics it was not given, or a plan the format cannot express.
    """
    t0 = time.perf_counter()
    check_out_dir(out_dir, overwrite)
    shard_size_bytes(max_shard_size)  # a bad size fails now
    if not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        raise QDoctorError("export needs a transformers model (with .config and save_pretrained)")
    layers = planned_layers(model, recipe.scheme if recipe is not None else None)
    if not any(ls is not None for ls in layers.values()):
        if recipe is None:
            raise QDoctorError("model is not quantized: call qdoctor.quantize(model, scheme) before exporting, "
                               "or pass recipe=")
        raise QDoctorError(f"scheme {recipe.scheme.name!r} quantizes no layer of this model")
    if recipe is not None and stats is None and (
            recipe.smoothing or any(ls is not None and ls.needs_calibration for ls in layers.values())):
        raise QDoctorError("this plan uses calibration statistics (static activation scales or smoothing): "
                           "calibrate first (qdoctor.calibrate) and pass stats=")
    profile = serving_profile(serve, require_vllm)
    view = PlanView(layers, model_fused_groups(model), getattr(recipe, "rotation", None))
    if profile is not None:
        refuse(check_view(view, profile), profile)
    plan = plan_for_layers(model, layers, _model_dtype(model), dtype, format_of=format_for(profile))
    serving = serving_summary(view, plan, profile)
    rotation = getattr(recipe, "rotation", None)
    if rotation is not None and stats is not None:
        stats = recipe.statistics(model, tokenizer, stats)  # statistics of an unrotated model: recalibrated
    qstats = recipe.quantization_stats(model, tokenizer, stats) if recipe is not None else None
    # GPTQ's weights (the codes exported), from its own pass over the calibration windows
    gptq = recipe.gptq_weights(model, tokenizer, stats, qstats, progress=progress) if recipe is not None else None
    with staged_dir(out_dir, overwrite) as tmp:
        with recipe.rotated(model) if rotation is not None else nullcontext() as notes:
            plan.warnings.extend(notes or [])
            _write_checkpoint(model, tokenizer, tmp, recipe, stats, qstats, gptq, layers, plan, max_shard_size,
                              progress)
        # the rotation undone: verification simulates the plan on the model as it was given
        checked = None
        if verify is not None:
            checked = verify_checkpoint(tmp, model, tokenizer, verify, recipe, stats, _model_dtype(model), gptq)
            if not checked.ok:
                raise QDoctorError(f"export verification failed: {checked.line()}; nothing was written to {out_dir}")
        report = write_report(model, plan, tmp, out_dir, card, t0, serving=serving, profile=profile,
                              verification=checked)
    return report


def _write_checkpoint(model, tokenizer, tmp, recipe, stats, qstats, gptq, layers, plan, max_shard_size,
                      progress) -> None:
    """Write the checkpoint's files into the staging folder ``tmp``."""
    config = copy.deepcopy(model.config)
    config.dtype = plan.dtype
    _untie_quantized(model, config, layers, plan)
    with torch.device("meta"), _quiet("transformers"):
        check_targets(type(model)(config), plan)  # before any block is read
    group_of = plan.group_of()
    prefix = arch_for(model).blocks + "."
    online = {}  # layer → its online input transform (R4), written as a transform_config
    writer = ShardWriter(tmp, max_shard_size)
    for i in tqdm(range(len(get_blocks(model))), desc="exporting", unit="block", disable=not progress,
                  leave=False):
        with materialized(model, i, transient=recipe is not None) as block:
            if recipe is not None:
                recipe.apply_block(model, i, block, stats, qstats, gptq=gptq)
            block_online = online_transforms(block, f"{prefix}{i}.")
            online.update(block_online)
            writer.add(_saved_names(model, {**module_tensors(block, f"{prefix}{i}.", group_of, plan.dtype),
                                            **transform_tensors(block_online, plan.dtype)}))
        if max_shard_size is None:
            writer.flush()
    head = recipe.apply_rest(model, stats) if recipe is not None else None
    try:
        writer.add(_saved_names(model, rest_tensors(model, prefix, group_of, plan.dtype)))
    finally:
        if head is not None:
            restore(model)
    writer.close()
    config.save_pretrained(tmp)
    _compressor(plan, transform_config(online)).update_config(str(tmp))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def serving_profile(serve: "ServeProfile | str | None", require_vllm: bool = False) -> ServeProfile | None:
    """The profile to check against: ``serve`` (a name → its default options), ``vllm`` for
    ``require_vllm``, None for no check."""
    if isinstance(serve, str):
        serve = ServeProfile(serve)
    if serve is None and require_vllm:
        serve = ServeProfile("vllm")
    return serve


def format_for(profile: ServeProfile | None):
    """``LayerScheme → format | None``: the storage format ``profile``'s kernel needs (vLLM's
    Humming kernel reads ``pack-quantized``); None where the inferred one serves."""
    if profile is None or profile.runtime != "vllm":
        return None
    return lambda ls: vllm_kernel(ls, profile).format


def serving_summary(view: PlanView, plan: ExportPlan, profile: ServeProfile | None) -> dict:
    """What vLLM makes of the checkpoint: violations per GPU generation (at the profile's tp and
    kernel options) and the vLLM kernel of each config group."""
    opts = profile if profile is not None and profile.runtime == "vllm" else ServeProfile("vllm")
    per_gpu = {gpu: [v.line() for v in check_view(view, ServeProfile("vllm", gpu, opts.tp,
                                                                      opts.allow_optional_kernels))]
               for gpu in GPU_CAPABILITY}
    kernels = {}
    for g in plan.groups:
        k = vllm_kernel(g.scheme, opts)
        kernels[g.name] = k.kernel or f"none ({k.why_not})"
    return {"vllm": per_gpu, "options": {"tp": opts.tp, "allow_optional_kernels": opts.allow_optional_kernels},
            "kernels": kernels}



def planned_layers(model: nn.Module, scheme=None) -> "OrderedDict[str, LayerScheme | None]":
    """Every linear-like layer in module order → the ``LayerScheme`` it has (a ``QuantLinear``)
    or, with ``scheme``, will have (``quant.apply.layer_scheme_for``; None: left as is) — read
    off the module tree without any weight (a lazy model's blocks are on ``meta``).

    Linear-like = ``nn.Linear``, ``QuantLinear``, and modules vLLM builds as linear layers
    (MoE routers/gates; compressed-tensors' ``get_vllm_module_type``)."""
    from compressed_tensors.quantization.quant_config import get_vllm_module_type

    out: "OrderedDict[str, LayerScheme | None]" = OrderedDict()
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            out[name] = m.scheme
        elif isinstance(m, nn.Linear):
            out[name] = layer_scheme_for(scheme, name, m.weight.dtype) if scheme is not None else None
        elif name and get_vllm_module_type(type(m).__name__) == "Linear" and getattr(m, "weight", None) is not None:
            out[name] = None
    return out


def write_report(model, plan: ExportPlan, tmp: Path, out_dir, card: dict | None, t0: float,
                 serving: dict | None = None, profile: ServeProfile | None = None,
                 verification: Verification | None = None) -> ExportReport:
    """The export report of the checkpoint staged in ``tmp``; writes the model card (README.md)
    and the provenance file beside the weights."""
    report = ExportReport(
        out_dir=str(Path(out_dir).expanduser()), format=str(plan.config.format),
        checkpoint_dtype=dtype_name(plan.dtype), groups=[g.to_dict() for g in plan.groups],
        unquantized=dict(plan.unquantized), warnings=list(plan.warnings), vllm_issues=plan.vllm_issues(),
        serve=profile.to_dict() if profile is not None else None, serving=dict(serving or {}),
        verification=verification.to_dict() if verification is not None else None)
    if serving and profile is not None and profile.runtime == "vllm":
        report.vllm_issues = list(serving["vllm"][profile.gpu])  # the profile's own verdict
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


def plan_for_layers(model: nn.Module, layers: "OrderedDict[str, LayerScheme | None]", model_dtype: torch.dtype,
                    dtype=None, format_of=None) -> ExportPlan:
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
    plan = plan_export(layers, reasons, ckpt_dtype, class_target_ok=class_ok, format_of=format_of)
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
    # the compressor is given ŵ = q·s, not W: round(ŵ/s) = q exactly (|q·s/s − q| ≪ 1/2), so the codes
    # are qdoctor's whatever chose the scale. From W, a clipped scale (observer mse) would differ:
    # compressed-tensors clamps INT8 to [−128, 127], qdoctor to ±127.
    w_hat = ql.dequantized_weight()  # not cached on the layer: one layer's fp32 copy at a time
    state = {"weight": w_hat, "weight_scale": ct_weight_scale(ql)}
    if ql.input_scale is not None:
        state["input_scale"] = ql.input_scale.detach().float().reshape(1)
    packed = compressor.compress(state, ct_scheme)
    del state
    restored = compressor.decompress(dict(packed), ct_scheme)["weight"]
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


def module_tensors(module: nn.Module, prefix: str, group_of: dict, dtype: torch.dtype,
                   skip: str | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of ``module`` (a treated block, or the model itself with the blocks
    under ``skip`` left out), by full name: quantized layers compressed, kept layers in their kept
    dtype, every other tensor in the checkpoint dtype; a tensor shared by two names (a tied LM head)
    is stored once, under its first name, as ``save_pretrained`` does."""
    out: dict[str, torch.Tensor] = {}
    owners = set()
    for name, m in module.named_modules():
        if not isinstance(m, QuantLinear) or (skip and (prefix + name).startswith(skip)):
            continue
        owners.add(name)
        packed = (compress_layer(m, group_of[prefix + name].ct_scheme, dtype) if m.scheme.is_quantized
                  else kept_layer_tensors(m))
        out.update({f"{prefix}{name}.{k}": v for k, v in packed.items()})
    seen = set()
    for key, t in module.state_dict(keep_vars=True).items():
        if key.rpartition(".")[0] in owners or (skip and (prefix + key).startswith(skip)) or id(t) in seen:
            continue
        seen.add(id(t))
        out[prefix + key] = t.detach().to(dtype) if t.is_floating_point() else t.detach()
    return out


def rest_tensors(model: nn.Module, block_prefix: str, group_of: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Everything outside the decoder blocks: embeddings, final norm, LM head (quantized or not)."""
    return module_tensors(model, "", group_of, dtype, skip=block_prefix)


def _saved_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors under the names transformers saves them with (its load-time renamings undone,
    as ``save_pretrained`` does; identity for most families)."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, tensors)


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
               "GIB": 2**30, "TIB": 2**40}


def shard_size_bytes(size: "int | str | None") -> int | None:
    """``2GB`` → 2·10⁹ bytes (``save_pretrained``'s units; ``GiB`` = 2³⁰), an int as it is, None as it is."""
    if size is None or isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise QDoctorError(f"bad shard size {size!r}: use e.g. 2GB, 500MB or 'block'")
    return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").upper()])


class ShardWriter:
    """Safetensors shards written as tensors arrive: a shard is flushed once it holds
    ``max_shard_size`` bytes (None: only when ``flush`` is called). ``close`` names them as
    ``save_pretrained`` does — ``model.safetensors`` alone, else ``model-0000k-of-0000n`` plus
    ``model.safetensors.index.json``."""

    def __init__(self, out: Path, max_shard_size: "int | str | None"):
        self.out = out
        self.limit = shard_size_bytes(max_shard_size)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            size = t.numel() * t.element_size()
            if self.limit is not None and self.pending and self.pending_bytes + size > self.limit:
                self.flush()
            # a copy: the block the tensor came from may be put back before the shard is written
            self.pending[name] = t.detach().to("cpu", copy=True).contiguous()
            self.pending_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.out / f".shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.total += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self.flush()
        n = len(self.shards)
        if n == 1:
            self.shards[0][0].rename(self.out / "model.safetensors")
            return
        weight_map = {}
        for j, (path, names) in enumerate(self.shards):
            final = f"model-{j + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.out / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _compressor(plan: ExportPlan, transforms=None):
    from compressed_tensors.compressors import ModelCompressor

    return ModelCompressor(quantization_config=plan.config, transform_config=transforms)


def _untie_quantized(model, config, layers: dict, plan: ExportPlan) -> None:
    """A quantized layer whose weight is shared (a tied ``lm_head`` and embeddings) cannot stay
    tied: the embedding keeps floating point, the layer is stored as codes."""
    shared: dict[int, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        shared.setdefault(id(v), []).append(k)
    tied = []
    for name, ls in layers.items():
        w = getattr(model.get_submodule(name), "weight", None)
        if ls is not None and ls.is_quantized and w is not None and len(shared.get(id(w), [])) > 1:
            tied.append(name)
    if tied:
        for cfg in (config, getattr(config, "text_config", None)):
            if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
                cfg.tie_word_embeddings = False
        plan.warnings.append(f"{', '.join(tied)} shared its weight with another tensor (tied embeddings); "
                             "the checkpoint stores them untied (tie_word_embeddings=false)")


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
