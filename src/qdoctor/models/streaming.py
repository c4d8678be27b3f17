"""The block pipeline: every pass over a model runs here, one decoder block at a time.

Calibration, scan statistics, plan evidence, treatment, perplexity and export all walk the
blocks with ``stream_blocks``: the inputs of block 0 are captured once, then for each block i

    X_{i+1} = block_i(X_i, **kwargs_i)

with whatever hooks or treatment the caller applies to block i in between. A whole model in
memory is the one-source case of the same mechanism: where the blocks come from is the
business of the model's *block source* (``block_source``):

- ``ResidentBlocks`` — the blocks of a model in memory, yielded as they are; a *transient*
  pass snapshots block i when it is opened and puts it back when it is closed (quantized
  layers restored, weights reloaded), so a treatment lasts only while the block runs;
- ``models.lazy.LazyBlocks`` — a checkpoint's blocks, read from their source when opened and
  dropped back to ``meta`` when closed (transient by nature).

Memory: one block (plus its snapshot in a transient resident pass) and the N × L × hidden
activations, however deep the model. What needs every block at once (zero-shot scoring,
treating a model in place) asks ``require_resident`` first: the one place that decides it.

Capturing: every block's ``forward`` is temporarily replaced by a recorder that stores its
keyword arguments (attention masks, rotary embeddings — per block, since Gemma mixes sliding
and full attention) and returns its input unchanged; the last recorder stops the forward
before the final norm and LM head. Nothing but the embeddings is computed.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from qdoctor.distributed import World
from qdoctor.errors import QDoctorError
from qdoctor.models.registry import arch_for, get_blocks
from qdoctor.quant.apply import restore
from qdoctor.quant.linear import clear_input_transforms


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    """The calibration inputs of one block: hidden states and keyword arguments per batch."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]

    @torch.no_grad()
    def forward(self, block: nn.Module) -> list[torch.Tensor]:
        """Run every batch through ``block``; returns the outputs (the next block's inputs)."""
        dev = next(block.parameters()).device
        outs = []
        for h, kw in zip(self.hidden, self.kwargs):
            out = block(h.to(dev), **{k: _to(v, dev) for k, v in kw.items()})
            out = out[0] if isinstance(out, tuple) else out
            outs.append(out.to(h.device))
        return outs

    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


def _to(v, dev):
    if isinstance(v, torch.Tensor):
        return v.to(dev)
    if isinstance(v, tuple):
        return tuple(_to(x, dev) for x in v)
    if isinstance(v, dict):
        return {k: _to(x, dev) for k, x in v.items()}
    return v


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 4):
    """(block-0 inputs, per-block kwargs): ``BlockInputs`` for block 0 and a list (one per block)
    of per-batch kwargs dicts."""
    blocks = get_blocks(model, arch_for(model))
    n = len(blocks)
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in range(n)]
    device = next(model.parameters()).device

    def recorder(i):
        def fwd(hidden_states, *args, **kw):
            if i == 0:
                hidden.append(hidden_states.detach())
            kw = dict(kw)
            kw.pop("past_key_values", None)
            kw["use_cache"] = False
            kwargs[i].append(kw)
            if i == n - 1:
                raise _StopForward
            return hidden_states

        return fwd

    # An instance-level forward (accelerate's device-map hooks put one there) is put back after.
    saved = [b.__dict__.get("forward") for b in blocks]
    for i, b in enumerate(blocks):
        b.forward = recorder(i)
    try:
        for s in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids[s:s + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for b, fwd in zip(blocks, saved):
            if fwd is None:
                del b.forward  # back to the class's forward
            else:
                b.forward = fwd
    return BlockInputs(hidden, kwargs[0]), kwargs


def stream_blocks(model: nn.Module, input_ids: torch.Tensor,
                  on_block: Callable[[int, nn.Module, BlockInputs], "list[torch.Tensor] | None"],
                  batch_size: int = 4, progress: bool = True, desc: str = "blocks",
                  final_outputs: bool = False, transient: bool = False,
                  world: World | None = None) -> "list[torch.Tensor] | None":
    """Call ``on_block(i, block, inputs)`` for each block in order. It may register hooks, run
    ``inputs.forward(block)`` itself (and return the outputs), or treat the block; when it
    returns None the outputs of the (possibly treated) block feed the next block.

    Block i is opened from the model's block source before ``on_block`` and closed once its
    outputs exist; with ``transient`` whatever ``on_block`` did to a resident block is undone
    then (a lazy block is always dropped). With ``final_outputs`` the last block's outputs are
    returned (the input of the final norm); the last block runs only then or when ``on_block``
    runs it. Running out of device memory is a one-line error naming the block.

    With a ``world`` of several ranks this rank runs only its shard of ``input_ids``, whole
    batches of them (``world.shard(N, batch_size)``; the outputs are the shard's): combining the
    ranks' results is the caller's business (``qdoctor.distributed``)."""
    blocks = get_blocks(model, arch_for(model))
    if world is not None:
        input_ids = input_ids[world.shard(input_ids.shape[0], batch_size)]
    inputs, all_kwargs = capture_block_inputs(model, input_ids, batch_size)
    out = None
    for i in tqdm(range(len(blocks)), desc=desc, unit="block", disable=not progress, leave=False):
        inputs = BlockInputs(inputs.hidden, all_kwargs[i])
        try:
            with materialized(model, i, transient=transient) as block:
                out = on_block(i, block, inputs)
                if out is None and (i + 1 < len(blocks) or final_outputs):
                    out = inputs.forward(block)
        except torch.OutOfMemoryError:
            raise QDoctorError(f"out of device memory in decoder block {i} ({desc}, {inputs.tokens()} tokens "
                               f"in {len(inputs.hidden)} batches): use fewer or shorter calibration samples "
                               "(--calib-samples / --calib-seqlen), fewer --sample-rows, or a device with "
                               "more memory") from None
        if i + 1 < len(blocks):
            inputs = BlockInputs(out, all_kwargs[i + 1])
    return out if final_outputs else None


def each_block(model: nn.Module, fn: Callable[[int, nn.Module], None], progress: bool = False,
               desc: str = "blocks") -> None:
    """``fn(i, block)`` for every decoder block, opened one at a time (weights only, no forward)."""
    for i in tqdm(range(len(get_blocks(model))), desc=desc, unit="block", disable=not progress, leave=False):
        with materialized(model, i) as block:
            fn(i, block)


class ResidentBlocks:
    """The block source of a model in memory (see the module docstring)."""

    resident = True

    def __init__(self, transient: bool = False):
        self.transient = transient
        self._saved: dict[int, dict[str, torch.Tensor]] = {}

    def load(self, model: nn.Module, i: int) -> nn.Module:
        block = get_blocks(model)[i]
        if self.transient:
            self._saved[i] = {k: v.detach().clone() for k, v in block.state_dict().items()}
        return block

    def release(self, model: nn.Module, i: int) -> None:
        saved = self._saved.pop(i, None)
        if saved is not None:
            block = get_blocks(model)[i]
            restore(block)
            clear_input_transforms(block)  # an online rotation (R4) is undone with its weights
            block.load_state_dict(saved)


def block_source(model: nn.Module, transient: bool = False):
    """Where ``model``'s blocks come from: its ``LazyBlocks`` (a block-streamed model) or
    ``ResidentBlocks``. Both have ``resident``, ``load(model, i)`` and ``release(model, i)``."""
    lazy = getattr(model, "qdoctor_lazy", None)
    return lazy if lazy is not None else ResidentBlocks(transient)


def require_resident(model: nn.Module, capability: str, hint: str = "") -> None:
    """Refuse, in one line, what needs every block of ``model`` in memory at once."""
    if not block_source(model).resident:
        raise QDoctorError(f"{capability} needs the whole model in memory: not available with --stream "
                           f"(a block-streamed model){hint}")


@contextmanager
def materialized(model: nn.Module, i: int, transient: bool = False) -> Iterator[nn.Module]:
    """Decoder block i with real weights while the ``with`` lasts (``block_source``): a lazy
    model's block is read on entry and put back on ``meta`` on exit (treatment and all, even on
    an error); a resident block is yielded as it is and, with ``transient``, restored on exit."""
    source = block_source(model, transient)
    block = source.load(model, i)
    try:
        yield block
    finally:
        source.release(model, i)
