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
and no choice is padded to the longest. Items are sorted longest first; the first item of a
batch sets the row length, and shorter items are packed several to a row (first fit; the mask
keeps items apart, position ids restart), so little is padded. ``batch_size`` counts requests
per forward, as in lm-eval, and an item is never split. The LM head runs only on the scored
positions (a pre-hook on the output embedding gathers them), and log-probabilities come from
logsumexp instead of a full log-softmax.

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

PREFIX, PAD = -1, -2  # branch ids: tokens every branch of the item sees; padding


@dataclass
class _Tree:
    """One item packed as prefix + branches (or, unpacked, a single request)."""

    tokens: list[int]
    positions: list[int]
    branches: list[int]  # PREFIX, or the request's index within the tree
    scored: list[list[int]]  # per request: tree positions whose logits predict its targets
    targets: list[list[int]]
    item: int  # index of the item
    first_request: int  # index of the tree's first request within the item
    packed: bool  # needs the 4D tree mask (else: a 2D padding mask, one tree per row)


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
    def _trees(self, item: int, pairs: list[tuple[list[int], list[int]]]) -> list[_Tree]:
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
            tokens, positions, branches, scored = list(inputs[0][:p]), list(range(p)), [PREFIX] * p, []
            for j, (x, t, f) in enumerate(zip(inputs, targets, first)):
                offset = len(tokens)
                tokens += x[p:]
                positions += range(p, len(x))
                branches += [j] * (len(x) - p)
                scored.append([i if i < p else offset + i - p for i in range(f, f + len(t))])
            return [_Tree(tokens, positions, branches, scored, targets, item, 0, packed=True)]
        return [_Tree(x, list(range(len(x))), [0] * len(x), [list(range(f, f + len(t)))], [t], item, j, packed=False)
                for j, (x, t, f) in enumerate(zip(inputs, targets, first))]

    def _batches(self, trees: list[_Tree]) -> list[list[list[_Tree]]]:
        """Batches of rows of trees. Longest first (as lm-eval: memory peaks early); the first
        tree of a batch sets its row length and later, shorter trees fill rows first-fit."""
        trees = sorted(trees, key=lambda t: (t.packed, -len(t.tokens)))
        batches: list[list[list[_Tree]]] = []
        rows: list[list[_Tree]] = []
        free: list[int] = []  # room left in each row of the open batch
        n_requests, width = 0, 0
        for tree in trees:
            n, size = len(tree.targets), len(tree.tokens)
            if rows and (n_requests + n > self.batch_size or rows[0][0].packed != tree.packed):
                batches.append(rows)
                rows, free, n_requests = [], [], 0
            if not rows:
                width = size
            slot = next((i for i, room in enumerate(free) if room >= size), None) if tree.packed else None
            if slot is None:
                rows.append([tree])
                free.append(width - size)
            else:
                rows[slot].append(tree)
                free[slot] -= size
            n_requests += n
        if rows:
            batches.append(rows)
        return batches

    # --- running ----------------------------------------------------------------------
    def _inputs(self, rows: list[list[_Tree]]) -> dict:
        length = max(sum(len(t.tokens) for t in row) for row in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        positions = torch.zeros((len(rows), length), dtype=torch.long)
        branches = torch.full((len(rows), length), PAD, dtype=torch.long)
        trees = torch.full((len(rows), length), -1, dtype=torch.long)  # which tree of the row
        for i, row in enumerate(rows):
            start = 0
            for k, t in enumerate(row):
                end = start + len(t.tokens)
                ids[i, start:end] = torch.tensor(t.tokens)
                positions[i, start:end] = torch.tensor(t.positions)
                branches[i, start:end] = torch.tensor(t.branches)
                trees[i, start:end] = k
                start = end
        if not rows[0][0].packed:
            return {"input_ids": ids.to(self.device), "attention_mask": (branches != PAD).long().to(self.device)}
        idx = torch.arange(length)
        br_q, br_k = branches[:, :, None], branches[:, None, :]
        # Causal, same tree, and the key is prefix or on the query's own branch. Padding queries
        # see earlier padding (finite, never read); nothing else sees padding.
        allowed = ((idx[:, None] >= idx[None, :])[None] & (trees[:, :, None] == trees[:, None, :])
                   & ((br_k == PREFIX) | (br_k == br_q)))
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
    def _run_batch(self, rows: list[list[_Tree]]) -> list[tuple[float, bool]]:
        """(loglik, greedy) for every request of ``rows``, in row, tree, request order."""
        kwargs = self._inputs(rows)
        r_idx, c_idx, tgt, owner, lengths = [], [], [], [], []
        for i, row in enumerate(rows):
            start = 0
            for tree in row:
                for cols, t in zip(tree.scored, tree.targets):
                    r_idx += [i] * len(t)
                    c_idx += [start + c for c in cols]
                    tgt += t
                    owner += [len(lengths)] * len(t)
                    lengths.append(len(t))
                start += len(tree.tokens)
        rows_t, cols_t = torch.tensor(r_idx, device=self.device), torch.tensor(c_idx, device=self.device)
        logits = self._scored_logits(kwargs, rows_t, cols_t).float()
        tgt_t = torch.tensor(tgt, device=logits.device)
        owner_t = torch.tensor(owner, device=logits.device)
        # log p(target) = logit[target] − logsumexp(logits): the same as log_softmax, without
        # materializing a second [N, vocab] tensor.
        token_lp = (logits.gather(1, tgt_t[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)).double()
        hits = (logits.argmax(dim=-1) == tgt_t).long()
        n_req = len(lengths)
        ll = torch.zeros(n_req, dtype=torch.float64, device=logits.device).index_add_(0, owner_t, token_lp)
        n_hit = torch.zeros(n_req, dtype=torch.long, device=logits.device).index_add_(0, owner_t, hits)
        return [(a, b == n) for a, b, n in zip(ll.tolist(), n_hit.tolist(), lengths)]

    def score(self, items: list[list[tuple[list[int], list[int]]]], desc: str = "loglikelihood"
              ) -> list[list[tuple[float, bool]]]:
        """``items[i][j] = (context_tokens, continuation_tokens)`` → ``[(loglik, is_greedy)]`` per item."""
        trees = [tree for i, pairs in enumerate(items) for tree in self._trees(i, pairs)]
        out: list[list[tuple[float, bool] | None]] = [[None] * len(pairs) for pairs in items]
        with tqdm(total=sum(len(p) for p in items), desc=desc, unit="req", disable=not self.progress,
                  leave=False) as bar:
            for rows in self._batches(trees):
                results = iter(self._run_batch(rows))
                for row in rows:
                    for tree in row:
                        for j in range(len(tree.targets)):
                            out[tree.item][tree.first_request + j] = next(results)
                bar.update(sum(len(t.targets) for row in rows for t in row))
        return out  # type: ignore[return-value]
