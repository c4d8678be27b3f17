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
from tqdm.auto import tqdm

from qdoctor.calib.text import text_source
from qdoctor.errors import QDoctorError
from qdoctor.models.lazy import is_lazy
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
    """(W, seqlen) non-overlapping windows of the tokenized text."""
    if seqlen < 2:
        raise QDoctorError(f"seqlen must be at least 2, got {seqlen}")
    if not text or not text.strip():
        raise QDoctorError("the evaluation text is empty")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    body = seqlen - (1 if bos_id is not None else 0)
    n = ids.numel() // body
    if n == 0:
        raise QDoctorError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}; "
                           "use a smaller --seqlen or a longer text")
    rows = ids[: n * body].view(n, body)
    if bos_id is not None:
        rows = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), rows], dim=1)
    return rows


@torch.no_grad()
def perplexity(model, tokenizer, text: str | None = None, source: str = "wikitext2:test", seqlen: int = 2048,
               limit: int | None = None, batch_size: int = 1, progress: bool = True,
               windows: torch.Tensor | None = None, desc: str = "perplexity",
               block_transform=None) -> PerplexityResult:
    """Perplexity of ``model`` over the first ``limit`` windows (all when None).

    ``windows`` (W, L) may be passed to reuse one tokenization across several models.
    ``block_transform(i, block)``, for a block-streamed model only, changes each block as it is
    read (e.g. quantizes it): the perplexity of the treated model without holding it."""
    from qdoctor.models.registry import arch_for

    if windows is None:
        arch = arch_for(model)
        bos = tokenizer.bos_token_id if arch.needs_bos else None
        windows = token_windows(tokenizer, text if text is not None else text_source(source), seqlen, bos)
    total = windows.shape[0]
    if limit is not None:
        if limit < 1:
            raise QDoctorError(f"--limit must be at least 1, got {limit}")
        windows = windows[:limit]
    device = next(model.parameters()).device
    nll_sum, count = 0.0, 0
    t0 = time.perf_counter()
    if block_transform is not None and not is_lazy(model):
        raise QDoctorError("block_transform needs a block-streamed model (qdoctor.load(..., stream=True))")
    if is_lazy(model):
        nll_sum, count = _streamed_nll(model, windows, batch_size, progress, desc, block_transform=block_transform)
        nll = nll_sum / count
        return PerplexityResult(ppl=math.exp(nll), nll=nll, n_tokens=count, n_windows=int(windows.shape[0]),
                                total_windows=int(total), seqlen=int(windows.shape[1]),
                                seconds=time.perf_counter() - t0)
    bar = tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="win", disable=not progress, leave=False)
    for i in bar:
        batch = windows[i:i + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        target = batch[:, 1:]
        nll_sum += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        count += target.numel()
        bar.set_postfix(ppl=f"{math.exp(nll_sum / count):.3f}")
    nll = nll_sum / count
    return PerplexityResult(ppl=math.exp(nll), nll=nll, n_tokens=count, n_windows=int(windows.shape[0]),
                            total_windows=int(total), seqlen=int(windows.shape[1]),
                            seconds=time.perf_counter() - t0)


@torch.no_grad()
def _streamed_nll(model, windows: torch.Tensor, batch_size: int, progress: bool, desc: str,
                  block_transform=None) -> tuple[float, int]:
    """(Σ NLL, token count) of a lazy model: every window goes through block i before block i+1
    is read (``models.streaming``), then the final norm and LM head run one batch at a time.
    ``block_transform(i, block)`` may change block i (e.g. quantize it) before it runs."""
    from qdoctor.models.lazy import final_logits
    from qdoctor.models.streaming import stream_blocks

    def on_block(i, block, inputs):
        if block_transform is not None:
            block_transform(i, block)
        return None

    hidden = stream_blocks(model, windows, on_block, batch_size=max(batch_size, 1), progress=progress, desc=desc,
                           final_outputs=True)
    nll_sum, count, start = 0.0, 0, 0
    vocab = model.get_output_embeddings().weight.shape[0]
    for h in hidden:
        batch = windows[start:start + h.shape[0]].to(h.device)
        start += h.shape[0]
        states = h[:, :-1].reshape(-1, h.shape[-1])
        target = batch[:, 1:].reshape(-1)
        # tokens whose fp32 logits are alive at once: 2^26 logits = 523 tokens of a 128k vocabulary
        for rows in row_slices(states.shape[0], vocab, _HEAD_CHUNK_ELEMS):
            logits = final_logits(model, states[rows]).float()
            nll_sum += float(F.cross_entropy(logits, target[rows], reduction="sum"))
        count += target.numel()
    return nll_sum, count


_HEAD_CHUNK_ELEMS = ROW_BLOCK_ELEMS  # fp32 logits computed at once by the streamed evaluation
