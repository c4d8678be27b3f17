"""Perplexity on WikiText-2 (or any text), the GPTQ/SmoothQuant recipe.

The text (test split rows joined with "\\n\\n", see ``calib.text``) is tokenized once and cut
into non-overlapping windows of ``seqlen`` tokens (the tail shorter than a window is dropped).
Each window predicts its tokens 2..L from the preceding ones:

    PPL = exp( Σ_windows Σ_{t=2..L} −log p(x_t | x_<t) / (W · (L − 1)) )

For models that need <bos> (Gemma), each window is [bos] + (L − 1) text tokens and the
L − 1 text tokens are all predicted.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from qdoctor.calib.text import text_source
from qdoctor.calib.windows import consecutive_windows, window_body
from qdoctor.distributed import World, current_world
from qdoctor.errors import QDoctorError
from qdoctor.models.lazy import final_logits
from qdoctor.models.registry import bos_token_id
from qdoctor.models.streaming import stream_blocks
from qdoctor.quant.fake import ROW_BLOCK_ELEMS, row_slices


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean token negative log-likelihood (nats)
    n_tokens: int  # predicted tokens
    n_windows: int
    total_windows: int  # windows available in the text
    seqlen: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def token_windows(tokenizer, text: str, seqlen: int, bos_id: int | None = None) -> torch.Tensor:
    """(W, seqlen) non-overlapping windows of the tokenized text (``calib.windows``)."""
    window_body(seqlen, bos_id)  # a bad seqlen fails before the text is tokenized
    if not text or not text.strip():
        raise QDoctorError("the evaluation text is empty")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    return consecutive_windows(ids, seqlen, bos_id)


@torch.no_grad()
def perplexity(model, tokenizer, text: str | None = None, source: str = "wikitext2:test", seqlen: int = 2048,
               limit: int | None = None, batch_size: int = 1, progress: bool = True,
               windows: torch.Tensor | None = None, desc: str = "perplexity",
               block_transform=None) -> PerplexityResult:
    """Perplexity of ``model`` over the first ``limit`` windows (all when None).

    ``windows`` (W, L) may be passed to reuse one tokenization across several models.
    The windows run through the block pipeline (``models.streaming``), all of them through
    block i before block i + 1, then the final norm and LM head one batch at a time.
    ``block_transform(i, block)`` treats each block as it is opened (e.g. quantizes it) and
    the treatment is undone when the block is closed: the perplexity of the treated model,
    for a model in memory and a block-streamed one alike, without keeping it treated."""
    if windows is None:
        windows = token_windows(tokenizer, text if text is not None else text_source(source), seqlen,
                                bos_token_id(model, tokenizer))
    total = windows.shape[0]
    if limit is not None:
        if limit < 1:
            raise QDoctorError(f"--limit must be at least 1, got {limit}")
        windows = windows[:limit]
    t0 = time.perf_counter()
    nll_sum, count = window_nll(model, windows, batch_size, progress, desc, block_transform=block_transform)
    nll = nll_sum / count
    return PerplexityResult(ppl=math.exp(nll), nll=nll, n_tokens=count, n_windows=int(windows.shape[0]),
                            total_windows=int(total), seqlen=int(windows.shape[1]),
                            seconds=time.perf_counter() - t0)


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = False, desc: str = "perplexity",
               block_transform=None, world: World | None = None) -> tuple[float, int]:
    """(Σ NLL, predicted-token count) of ``windows``: the blocks through the pipeline, then the
    final norm and LM head per batch, ``_HEAD_CHUNK_ELEMS`` fp32 logits at a time.
    ``block_transform(i, block)`` treats block i for this pass only (see ``perplexity``).

    Over several ranks (``world``, default ``current_world()``) each scores its shard of whole
    batches; the per-chunk NLL sums are gathered in window order and added in that order on
    every rank: the float additions, and so the bits, of one process."""
    world = current_world() if world is None else world
    batch_size = max(batch_size, 1)

    def on_block(i, block, inputs):
        if block_transform is not None:
            block_transform(i, block)
        return None

    hidden = stream_blocks(model, windows, on_block, batch_size=batch_size, progress=progress and world.is_main,
                           desc=desc, final_outputs=True, transient=block_transform is not None, world=world)
    mine = windows[world.shard(windows.shape[0], batch_size)]
    terms, counts, start = [], [], 0
    vocab = model.get_output_embeddings().weight.shape[0]
    for h in hidden:
        batch = mine[start:start + h.shape[0]].to(h.device)
        start += h.shape[0]
        states = h[:, :-1].reshape(-1, h.shape[-1])
        target = batch[:, 1:].reshape(-1)
        # tokens whose fp32 logits are alive at once: 2^26 logits = 523 tokens of a 128k vocabulary
        for rows in row_slices(states.shape[0], vocab, _HEAD_CHUNK_ELEMS):
            logits = final_logits(model, states[rows]).float()
            terms.append(float(F.cross_entropy(logits, target[rows], reduction="sum")))
        counts.append(target.numel())
    nll_sum = 0.0
    for t in world.concat(terms):
        nll_sum += t
    return nll_sum, sum(world.concat(counts))


_HEAD_CHUNK_ELEMS = ROW_BLOCK_ELEMS  # fp32 logits computed at once by the head
