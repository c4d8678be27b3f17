"""The GPTQ calibration pass: ``quant.gptq`` wired to a model through the block pipeline.

For each decoder block i (``models.streaming.stream_blocks`` over the calibration windows):

1. ``prepare(i, block)`` treats the block as far as the plan goes before weight rounding
   (rotation, smoothing: folded into the weights, so the hooks below see the treated inputs)
   and returns ``finish(weights)``, which quantizes the block with the given GPTQ weights;
2. one pre-hook per input group (``ArchSpec.input_groups``: q/k/v share one input, gate/up one)
   folds the inputs into a ``HessianAccumulator`` while the windows run through the block;
3. the quantized linears of each input group are rounded together by ``gptq_quantize_shared``
   (one factorisation of the group's Hessian, one column loop over their stacked rows), each
   on its own ``LayerScheme``'s weight grid; the Hessians are freed;
4. the next block's inputs are the treated full-precision block's outputs (step 2's forward),
   or with ``propagate`` those of the block quantized with its GPTQ weights (``finish``, one
   more forward): error propagation, llm-compressor's sequential pipeline.

The result, a ``GPTQWeights``, holds each layer's int8/fp8 codes and scale (1 byte per weight):
in memory for a model in memory, spilled to one safetensors file per block in a temporary
folder for a block-streamed model (removed when the object goes away). The passes that apply
the plan afterwards (perplexity, export) hand ``weights.block(i)`` to ``quant.apply.quantize``.

Memory: one block's Hessians at a time, K × K fp32 per input group: for a Llama-3-70B block
(hidden 8192, intermediate 28672) 3 × 8192² × 4 B = 0.8 GB plus down_proj's 28672² × 4 B = 3.3 GB,
4.1 GB in all, plus the fp64 copy of the one being factorised (6.6 GB for down_proj) — held
one block at a time, never for the whole model. Layers outside ``ArchSpec.linears`` (a MoE
router) and kept layers are rounded to nearest as before.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from qdoctor.models.registry import arch_for
from qdoctor.models.streaming import block_source, stream_blocks
from qdoctor.quant.apply import layer_scheme_for
from qdoctor.quant.fake import quantize as quantize_codes
from qdoctor.quant.gptq import GPTQConfig, HessianAccumulator, dequantize_codes, gptq_quantize_shared
from qdoctor.quant.spec import Scheme


class GPTQWeights:
    """Per block, per layer (full name): the GPTQ weight as int8/fp8 codes and its fp32 scale
    (``compute_scale``'s shape). ``spill``: keep each block in a safetensors file of a temporary
    folder instead of memory."""

    def __init__(self, scheme: Scheme, config: GPTQConfig, spill: bool = False):
        self.scheme = scheme
        self.config = config
        self._blocks: dict[int, dict[str, torch.Tensor]] = {}
        self.folder: Path | None = None
        self.seconds = {"calibration": 0.0, "gptq": 0.0}  # the pass's forwards + hooks; GPTQ's math
        if spill:
            self.folder = Path(tempfile.mkdtemp(prefix="qdoctor-gptq-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.folder), True)

    def put(self, i: int, layers: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Store block i's {name: (Ŵ, scale)} as codes + scales."""
        tensors = {}
        for name, (w_hat, scale) in layers.items():
            codes, _ = quantize_codes(w_hat, self._spec(name), scale)
            tensors[f"{name}.codes"] = codes.cpu().contiguous()
            tensors[f"{name}.scale"] = scale.float().cpu().contiguous()
        if self.folder is not None:
            save_file(tensors, str(self.folder / f"block-{i:05d}.safetensors"))
        else:
            self._blocks[i] = tensors

    def block(self, i: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Block i's {name: (Ŵ fp32, scale)} ({} when GPTQ rounded none of its layers)."""
        if self.folder is not None:
            path = self.folder / f"block-{i:05d}.safetensors"
            tensors = load_file(str(path)) if path.is_file() else {}
        else:
            tensors = self._blocks.get(i, {})
        out = {}
        for key, codes in tensors.items():
            if key.endswith(".codes"):
                name = key[:-len(".codes")]
                scale = tensors[f"{name}.scale"]
                out[name] = (dequantize_codes(codes, self._spec(name), scale), scale)
        return out

    def _spec(self, name: str):
        return self.scheme.resolve(name).weights


def gptq_pass(model: nn.Module, input_ids: torch.Tensor, scheme: Scheme, config: GPTQConfig,
              prepare: Callable[[int, nn.Module], Callable[[dict], object]], batch_size: int = 4,
              progress: bool = True) -> GPTQWeights:
    """Run GPTQ block by block over ``input_ids`` (the calibration windows); see the module
    docstring. ``prepare(i, block)`` treats block i up to weight rounding and returns
    ``finish(weights)`` that quantizes it with {name: (Ŵ, scale)}."""
    arch = arch_for(model)
    groups = arch.input_groups(model.config)
    store = GPTQWeights(scheme, config, spill=not block_source(model).resident)
    t_start = time.perf_counter()

    def on_block(i, block, inputs):
        prefix = f"{arch.blocks}.{i}."
        finish = prepare(i, block)
        targets = {}  # group leader (block-relative) → the quantized linears reading its input
        for group in groups:
            members = [rel for rel in group if _gptq_target(block, prefix + rel, rel, scheme)]
            if members:
                targets[group[0]] = members
        hessians = {lead: HessianAccumulator(block.get_submodule(lead).in_features) for lead in targets}
        handles = [block.get_submodule(lead).register_forward_pre_hook(
            lambda _m, args, _h=hessians[lead]: _h.update(args[0])) for lead in targets]
        try:
            outputs = inputs.forward(block)
        finally:
            for h in handles:
                h.remove()
        rounded = {}
        t0 = time.perf_counter()
        for lead, members in targets.items():
            H = hessians.pop(lead).hessian()
            ws = [block.get_submodule(rel).weight.detach() for rel in members]
            specs = [scheme.resolve(prefix + rel).weights for rel in members]
            for rel, r in zip(members, gptq_quantize_shared(ws, H, specs, config=config)):
                rounded[prefix + rel] = r
            del H
        _sync(block)
        store.seconds["gptq"] += time.perf_counter() - t0
        store.put(i, rounded)
        if config.propagate:
            finish(rounded)
            outputs = inputs.forward(block)
        return outputs

    stream_blocks(model, input_ids, on_block, batch_size=batch_size, progress=progress, desc="GPTQ", transient=True)
    store.seconds["calibration"] = time.perf_counter() - t_start - store.seconds["gptq"]
    return store


def _sync(block: nn.Module) -> None:
    """Wait for the device (the timings above are wall clock)."""
    p = next(block.parameters(), None)
    if p is not None and p.is_cuda:
        torch.cuda.synchronize(p.device)


def _gptq_target(block: nn.Module, name: str, rel: str, scheme: Scheme) -> bool:
    """Whether GPTQ rounds this linear: it exists, is an ``nn.Linear`` and the scheme quantizes it."""
    try:
        lin = block.get_submodule(rel)
    except AttributeError:
        return False
    if not isinstance(lin, nn.Linear):
        return False
    ls = layer_scheme_for(scheme, name, lin.weight.dtype)
    return ls is not None and ls.is_quantized
