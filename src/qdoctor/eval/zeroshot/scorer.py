"""Batched continuation log-likelihoods; each item's shared prefix is computed once.

For request j of an item, tokens_j = context_j + continuation_j (left-truncated to
``max_length + 1``, as lm-eval), the model reads tokens_j[:-1] and

    loglik_j = Σ_{t in continuation_j} log p(x_t | x_<t),   greedy_j = every x_t is the argmax.

Requests of one item share a long token prefix (the question; for BoolQ all of the context).
All of them are packed into ONE row as a tree — the common prefix once, then each request's
remaining tokens as a branch:

    row       = prefix | branch_1 | branch_2 | …          (no padding inside an item)
    positions = 0..p-1 | p..p+s_1-1 | p..p+s_2-1 | …       (each branch continues the prefix)
    attention : prefix causal; a branch token sees the prefix and the earlier tokens of its
                own branch, never another branch (a 4D mask)

so every branch computes exactly what its full sequence would, while the prefix runs once
and no choice is padded to the longest. Rows (items) are sorted by length and right-padded
in batches; ``batch_size`` counts requests per forward, as in lm-eval, and an item is never
split. The LM head runs only on the scored positions (a pre-hook on the output embedding
gathers them), and log-probabilities come from logsumexp instead of a full log-softmax.

Exact up to float rounding. Without a 4D-mask-capable attention ("sdpa" or "eager"), or with
``share_prefix=False``, each request is its own right-padded row with a 2D mask; so are
requests longer than a sliding attention window (the custom mask would bypass the window).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from qdoctor.errors import QDoctorError

PREFIX, PAD = -1, -2  # segment ids: tokens every branch sees; padding


@dataclass
class _Row:
    tokens: list[int]
    positions: list[int]
    segments: list[int]  # PREFIX, or the branch (request) index
    scored: list[list[int]]  # per request: row positions whose logits predict its targets
    targets: list[list[int]]
    item: int  # index of the item the row belongs to
    first_request: int  # index of the row's first request within the item
    packed: bool  # needs the 4D tree mask


def _common_prefix(seqs: list[list[int]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return n


class LoglikelihoodScorer:
    def __init__(self, model, batch_size: int = 16, max_length: int = 2048, share_prefix: bool = True,
                 pad_id: int = 0, progress: bool = True):
        if batch_size < 1:
            raise QDoctorError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.max_length = max_length
        self.pad_id = pad_id
        self.progress = progress
        config = getattr(model, "config", None)
        attn = getattr(config, "_attn_implementation", None)
        self.mask_kind = {"sdpa": "bool", "eager": "float"}.get(attn)
        takes_positions = "position_ids" in inspect.signature(model.forward).parameters
        self.share_prefix = (share_prefix and self.mask_kind is not None and takes_positions
                             and not getattr(config, "is_encoder_decoder", False))
        window = getattr(config, "sliding_window", None)
        self.window = window if isinstance(window, int) and getattr(config, "use_sliding_window", True) else None
        self.device = next(model.parameters()).device

    # --- planning ---------------------------------------------------------------------
    def _rows(self, item: int, pairs: list[tuple[list[int], list[int]]]) -> list[_Row]:
        inputs, targets, first = [], [], []
        for ctx, cont in pairs:
            if not ctx or not cont:
                raise QDoctorError("a request encoded to an empty context or continuation "
                                   "(lm-eval would reject it too); check the task data")
            if len(cont) > self.max_length:
                raise QDoctorError(f"a continuation of {len(cont)} tokens exceeds max_length {self.max_length}")
            tokens = (ctx + cont)[-(self.max_length + 1):]
            inputs.append(tokens[:-1])
            targets.append(cont)
            first.append(len(tokens) - 1 - len(cont))  # the logit at this position predicts cont[0]
        longest = max(len(x) for x in inputs)
        if self.share_prefix and (self.window is None or longest <= self.window):
            p = _common_prefix(inputs)
            tokens, positions, segments, scored = list(inputs[0][:p]), list(range(p)), [PREFIX] * p, []
            for j, (x, t, f) in enumerate(zip(inputs, targets, first)):
                offset = len(tokens)
                tokens += x[p:]
                positions += range(p, len(x))
                segments += [j] * (len(x) - p)
                scored.append([i if i < p else offset + i - p for i in range(f, f + len(t))])
            return [_Row(tokens, positions, segments, scored, targets, item, 0, packed=True)]
        return [_Row(x, list(range(len(x))), [0] * len(x), [list(range(f, f + len(t)))], [t], item, j, packed=False)
                for j, (x, t, f) in enumerate(zip(inputs, targets, first))]

    def _batches(self, rows: list[_Row]) -> list[list[_Row]]:
        # Longest first (as lm-eval: little padding, memory peaks early); a batch holds one mask kind.
        rows = sorted(rows, key=lambda r: (r.packed, -len(r.tokens)))
        batches, current, n_requests = [], [], 0
        for row in rows:
            n = len(row.targets)
            if current and (n_requests + n > self.batch_size or current[0].packed != row.packed):
                batches.append(current)
                current, n_requests = [], 0
            current.append(row)
            n_requests += n
        if current:
            batches.append(current)
        return batches

    # --- running ----------------------------------------------------------------------
    def _inputs(self, rows: list[_Row]) -> dict:
        length = max(len(r.tokens) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        positions = torch.zeros((len(rows), length), dtype=torch.long)
        segments = torch.full((len(rows), length), PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r.tokens)
            ids[i, :n] = torch.tensor(r.tokens)
            positions[i, :n] = torch.tensor(r.positions)
            segments[i, :n] = torch.tensor(r.segments)
        if not rows[0].packed:
            return {"input_ids": ids.to(self.device), "attention_mask": (segments != PAD).long().to(self.device)}
        idx = torch.arange(length)
        seg_q, seg_k = segments[:, :, None], segments[:, None, :]
        # Causal, and a key is visible if it is prefix or on the query's own branch. Padding
        # queries see the prefix and earlier padding (finite, never read); nothing sees padding.
        allowed = (idx[:, None] >= idx[None, :])[None] & ((seg_k == PREFIX) | (seg_k == seg_q))
        if self.mask_kind == "bool":
            mask = allowed[:, None]
        else:  # eager attention adds the mask to the scores
            dtype = next(self.model.parameters()).dtype
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                "position_ids": positions.to(self.device)}

    def _scored_logits(self, kwargs: dict, rows_t: torch.Tensor, cols_t: torch.Tensor) -> torch.Tensor:
        """Logits at (row, position) pairs, [N, vocab]; the LM head runs on those N only."""
        batch, length = kwargs["input_ids"].shape
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        fired = []

        def gather_scored(module, args):
            hidden = args[0]
            if hidden.dim() == 3 and hidden.shape[:2] == (batch, length):
                fired.append(True)
                return (hidden[rows_t, cols_t][None],) + tuple(args[1:])
            return None

        handle = head.register_forward_pre_hook(gather_scored) if isinstance(head, torch.nn.Module) else None
        try:
            logits = self.model(**kwargs).logits
        finally:
            if handle is not None:
                handle.remove()
        if fired and logits.shape[:2] == (1, rows_t.numel()):
            return logits[0]
        if logits.shape[:2] == (batch, length):  # the head was not called as a module
            return logits[rows_t, cols_t]
        raise QDoctorError(f"unexpected logits shape {tuple(logits.shape)} for input {(batch, length)}")

    @torch.inference_mode()
    def _run_batch(self, rows: list[_Row]) -> list[tuple[float, bool]]:
        """(loglik, greedy) for every request of ``rows``, in row order then request order."""
        kwargs = self._inputs(rows)
        r_idx, c_idx, tgt, owner = [], [], [], []
        n_req = 0
        for i, row in enumerate(rows):
            for cols, t in zip(row.scored, row.targets):
                r_idx += [i] * len(t)
                c_idx += cols
                tgt += t
                owner += [n_req] * len(t)
                n_req += 1
        rows_t, cols_t = torch.tensor(r_idx, device=self.device), torch.tensor(c_idx, device=self.device)
        logits = self._scored_logits(kwargs, rows_t, cols_t).float()
        tgt_t = torch.tensor(tgt, device=logits.device)
        owner_t = torch.tensor(owner, device=logits.device)
        # log p(target) = logit[target] − logsumexp(logits): the same as log_softmax, without
        # materializing a second [N, vocab] tensor.
        token_lp = (logits.gather(1, tgt_t[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)).double()
        hits = (logits.argmax(dim=-1) == tgt_t).long()
        ll = torch.zeros(n_req, dtype=torch.float64, device=logits.device).index_add_(0, owner_t, token_lp)
        n_hit = torch.zeros(n_req, dtype=torch.long, device=logits.device).index_add_(0, owner_t, hits)
        lengths = [len(t) for row in rows for t in row.targets]
        return [(a, b == n) for a, b, n in zip(ll.tolist(), n_hit.tolist(), lengths)]

    def score(self, items: list[list[tuple[list[int], list[int]]]], desc: str = "loglikelihood"
              ) -> list[list[tuple[float, bool]]]:
        """``items[i][j] = (context_tokens, continuation_tokens)`` → ``[(loglik, is_greedy)]`` per item."""
        rows = [row for i, pairs in enumerate(items) for row in self._rows(i, pairs)]
        out: list[list[tuple[float, bool] | None]] = [[None] * len(pairs) for pairs in items]
        with tqdm(total=sum(len(p) for p in items), desc=desc, unit="req", disable=not self.progress,
                  leave=False) as bar:
            for batch in self._batches(rows):
                results = iter(self._run_batch(batch))
                for row in batch:
                    for j in range(len(row.targets)):
                        out[row.item][row.first_request + j] = next(results)
                bar.update(sum(len(r.targets) for r in batch))
        return out  # type: ignore[return-value]
