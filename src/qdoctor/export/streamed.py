"""``export_streamed``: the compressed-tensors checkpoint of a block-streamed model, written one
decoder block at a time, for checkpoints larger than memory.

The files are those of ``export_checkpoint`` (config.json with the ``quantization_config``,
safetensors shards and their index, tokenizer, generation config, model card, report); only the
order of work differs. Block i is read from the source checkpoint, smoothed and quantized as
the recipe says (``policy.streamed.treat_block``), its layers compressed by the same
compressed-tensors compressors (``checkpoint.compress_layer``, which checks the round trip),
written as shard i + 1 and dropped before block i + 1 is read; the non-block tensors
(embeddings, final norm, LM head) form the last shard. Memory: one block plus the resident
non-block tensors. The tensors written equal ``export_checkpoint``'s for the same model and
recipe (tested). Quantized layers outside the decoder blocks (an LM head the scheme does not
ignore) are refused: they would need the whole head treated outside the block loop.
"""

from __future__ import annotations

import copy
import json
import time
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from qdoctor.errors import QDoctorError
from qdoctor.export.checkpoint import (
    ExportReport,
    _quiet,
    check_targets,
    compress_layer,
    kept_layer_tensors,
    plan_for_layers,
    require_vllm_servable,
    write_report,
)
from qdoctor.models.lazy import is_lazy
from qdoctor.models.registry import arch_for, get_blocks
from qdoctor.models.streaming import materialized
from qdoctor.quant.linear import QuantLinear
from qdoctor.quant.spec import LayerScheme, get_scheme


def export_streamed(model, tokenizer, out_dir, scheme, stats=None, smoothing=(), *, overwrite: bool = False,
                    card: dict | None = None, dtype: "str | torch.dtype | None" = None, require_vllm: bool = False,
                    progress: bool = True) -> ExportReport:
    """Quantize the lazy ``model`` (``qdoctor.load(..., stream=True)``) block by block with
    ``scheme`` after ``smoothing`` (``SmoothingStep``s; ``stats``: its ``CalibrationStats``, needed
    for static activation scales and smoothing) and write the checkpoint to ``out_dir``.

    Other arguments as ``export_checkpoint``'s (one shard per block: no ``max_shard_size``).
    Raises ``QDoctorError`` before anything is written for a model that is not lazy, an existing
    ``out_dir``, a plan the format cannot express or that quantizes layers outside the blocks."""
    from compressed_tensors.compressors import ModelCompressor

    from qdoctor.export.staging import check_out_dir, staged_dir
    from qdoctor.policy.streamed import check_streamable, treat_block

    t0 = time.perf_counter()
    if not is_lazy(model):
        raise QDoctorError("export_streamed needs a block-streamed model (qdoctor.load(..., stream=True)); "
                           "use export_checkpoint for a model in memory")
    check_out_dir(out_dir, overwrite)
    scheme = get_scheme(scheme)
    smoothing = list(smoothing)
    check_streamable(scheme, smoothing)
    arch = arch_for(model)
    n_blocks = len(get_blocks(model, arch))
    block_prefix = arch.blocks + "."
    lazy = model.qdoctor_lazy
    layers = streamed_layer_plan(model, scheme, lazy.dtype)
    outside = [n for n, ls in layers.items() if ls is not None and not n.startswith(block_prefix)]
    if outside:
        raise QDoctorError(f"--stream treats decoder blocks only, and the scheme also changes {outside[0]}: "
                           "add it to the scheme's ignore list, or export without --stream")
    if not any(ls is not None for ls in layers.values()):
        raise QDoctorError(f"scheme {scheme.name!r} quantizes no layer of this model")
    needs_stats = smoothing or any(ls is not None and ls.needs_calibration for ls in layers.values())
    if needs_stats and stats is None:
        raise QDoctorError("this plan uses calibration statistics (static activation scales or smoothing): "
                           "calibrate first (qdoctor.calibrate on the streamed model) and pass stats=")
    plan = plan_for_layers(model, layers, lazy.dtype, dtype)
    require_vllm_servable(plan, require_vllm)
    config = copy.deepcopy(model.config)
    config.dtype = plan.dtype
    with torch.device("meta"), _quiet("transformers"):
        check_targets(type(model)(config), plan)  # before any block is read
    group_of = plan.group_of()
    shard = [f"model-{j + 1:05d}-of-{n_blocks + 1:05d}.safetensors" for j in range(n_blocks + 1)]
    weight_map: dict[str, str] = {}
    total = 0
    with staged_dir(out_dir, overwrite) as tmp:
        for i in tqdm(range(n_blocks), desc="exporting", unit="block", disable=not progress, leave=False):
            with materialized(model, i) as block:
                treat_block(model, i, block, scheme, smoothing, stats)
                tensors = block_tensors(block, f"{block_prefix}{i}.", group_of, plan.dtype)
            total += _write_shard(tmp / shard[i], tensors, weight_map)
        total += _write_shard(tmp / shard[-1], non_block_tensors(model, block_prefix, plan.dtype), weight_map)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        config.save_pretrained(tmp)
        ModelCompressor(quantization_config=plan.config).update_config(str(tmp))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        report = write_report(model, plan, tmp, out_dir, card, t0)
    return report


def streamed_layer_plan(model: nn.Module, scheme, weight_dtype: torch.dtype) -> "OrderedDict[str, LayerScheme | None]":
    """Every ``nn.Linear`` → the ``LayerScheme`` that ``quantize`` will give it (None: left as is),
    read off the module tree without any weight (the blocks of a lazy model are on ``meta``)."""
    out: "OrderedDict[str, LayerScheme | None]" = OrderedDict()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            ls = scheme.resolve(name)
            out[name] = None if ls is None or (ls.keep == "fp32" and weight_dtype == torch.float32) else ls
    return out


def block_tensors(block: nn.Module, prefix: str, group_of: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one treated block, by full name: quantized layers compressed,
    kept layers in their kept dtype, everything else (norms) in the checkpoint dtype."""
    out: dict[str, torch.Tensor] = {}
    owners = set()
    for name, m in block.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        owners.add(name)
        packed = (compress_layer(m, group_of[prefix + name].ct_scheme, dtype) if m.scheme.is_quantized
                  else kept_layer_tensors(m))
        out.update({f"{prefix}{name}.{k}": v for k, v in packed.items()})
    for key, t in block.state_dict().items():
        if key.rpartition(".")[0] not in owners:
            out[prefix + key] = t.detach().to(dtype) if t.is_floating_point() else t.detach()
    return out


def non_block_tensors(model: nn.Module, block_prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Embeddings, final norm, LM head in the checkpoint dtype; a tied alias (LM head ↔
    embeddings) is stored once, under its first name, as ``save_pretrained`` does."""
    out, seen = {}, set()
    for key, t in model.state_dict(keep_vars=True).items():
        if key.startswith(block_prefix) or id(t) in seen:
            continue
        seen.add(id(t))
        out[key] = t.detach().to(dtype) if t.is_floating_point() else t.detach()
    return out


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], weight_map: dict[str, str]) -> int:
    """Write one safetensors shard (CPU, contiguous); record its tensors; return their bytes."""
    from safetensors.torch import save_file

    tensors = {k: v.to("cpu").contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(tensors, path.name))
    return sum(t.numel() * t.element_size() for t in tensors.values())
