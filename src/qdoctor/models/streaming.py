"""Block streaming: run calibration data through a decoder one block at a time.

The execution model shared by scan, fix and export: the calibration set's inputs to block 0
are captured once, then for each block i

    X_{i+1} = block_i(X_i, **kwargs_i)

with whatever hooks or transforms the caller applies to block i in between. Memory is one
block plus the N × L × hidden activations, however deep the model.

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

from qdoctor.models.registry import arch_for, get_blocks


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
                  final_outputs: bool = False) -> "list[torch.Tensor] | None":
    """Call ``on_block(i, block, inputs)`` for each block in order. It may register hooks, run
    ``inputs.forward(block)`` itself (and return the outputs), or transform the block; when it
    returns None the outputs of the (possibly transformed) block feed the next block.

    For a lazy model (``models.lazy.load_lazy``) block i is materialized from its source before
    ``on_block`` and dropped (back to ``meta``, transforms and all) once its outputs exist.
    With ``final_outputs`` the last block's outputs are returned (the input of the final norm)."""
    blocks = get_blocks(model, arch_for(model))
    inputs, all_kwargs = capture_block_inputs(model, input_ids, batch_size)
    out = None
    for i in tqdm(range(len(blocks)), desc=desc, unit="block", disable=not progress, leave=False):
        inputs = BlockInputs(inputs.hidden, all_kwargs[i])
        with materialized(model, i) as block:
            out = on_block(i, block, inputs)
            if out is None and (i + 1 < len(blocks) or final_outputs):
                out = inputs.forward(block)
        if i + 1 < len(blocks):
            inputs = BlockInputs(out, all_kwargs[i + 1])
    return out if final_outputs else None


@contextmanager
def materialized(model: nn.Module, i: int) -> Iterator[nn.Module]:
    """Decoder block i with real weights while the ``with`` lasts: a lazy model's block is read
    from its source on entry and put back on ``meta`` on exit (transforms and all, even on an
    error); an ordinary model's block is yielded as it is."""
    lazy = getattr(model, "qdoctor_lazy", None)
    block = lazy.load(model, i) if lazy is not None else get_blocks(model)[i]
    try:
        yield block
    finally:
        if lazy is not None:
            lazy.release(model, i)
