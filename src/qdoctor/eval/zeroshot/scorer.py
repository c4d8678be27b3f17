"""Batched continuation log-likelihoods; each item's shared prefix is computed once.

For request j of an item, tokens_j = context_j + continuation_j (left-truncated to
``max_length + 1``, as lm-eval), the model reads tokens_j[:-1] and

    loglik_j = Σ_{t in continuation_j} log p(x_t | x_<t),   greedy_j = every x_t is the argmax.

Requests of one item share a long token prefix (the question; for BoolQ all of the context).
All of them are packed into ONE segment as a tree — the common prefix once, then each
request's remaining tokens as a branch:

    segment   = prefix | branch_1 | branch_2 | …          (no padding inside an item)
    positions = 0..p-1 | p..p+s_1-1 | p..p+s_2-1 | …       (each branch continues the prefix)
    attention : prefix causal; a branch token sees the prefix and the earlier tokens of its
                own branch, never another branch (the item's tree mask)

so every branch computes exactly what its full sequence would, while the prefix runs once
and no choice is padded to the longest. ``batch_size`` counts distinct input sequences per
forward, as lm-eval's HFLM counts its batch (requests with the same context +
continuation[:-1], e.g. BoolQ's " no"/" yes", are one sequence); an item is never split.

Flat layout (models with "sdpa" attention whose layers are all attention): the items of a
batch are concatenated into ONE row of exactly their tokens — no padding at all, so every
linear layer multiplies real tokens only — with position ids that restart per item, and
attention runs item by item. This is an attention implementation registered with
transformers (``SEGMENT_ATTENTION``) that the model's config names only while the scorer's
forward runs (transformers then builds no mask); it calls transformers' own SDPA attention
on each item's slice with the item's tree mask (no mask, i.e. the causal kernel, for an item
with a single branch), or, for items of at most ``alone_from`` tokens, whose cost is mostly
the call itself, on several of them at once gathered into padded rows. Attention thus costs
Σ item², not rows × width². The scorer checks that every layer went through it, and
otherwise falls back to the row layout. Items join batches first-fit decreasing (longest
first), so batches are as full as lm-eval's and no extra forward runs. In the last layer only
the scored positions are read, so its MLP (position-wise) runs on those only (hooks gather
them and scatter the result back).

Row layout (other models with "sdpa" or "eager" attention): batches are consecutive in length
order; the first item of a batch sets the row length and shorter items are packed several to
a row (first fit), with a 4D mask that keeps items apart and position ids that restart.

In both layouts the LM head runs only on the scored positions, each once (a pre-hook on the
output embedding gathers them; the choices of an item are all predicted from its last shared
position), and log-probabilities come from an in-place logsumexp whose maximum also settles
the greedy check, instead of a full log-softmax and argmax. No KV cache is built.

Exact up to float rounding. Without a 4D-mask-capable attention ("sdpa" or "eager"), or with
``share_prefix=False``, each request is its own right-padded row with a 2D mask; so are
requests longer than a sliding attention window (the custom mask would bypass the window).
"""

from __future__ import annotations

import inspect
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from qdoctor.errors import QDoctorError
from qdoctor.models.streaming import require_resident

PREFIX, PAD = -1, -2  # branch ids: tokens every branch of the item sees; padding

SEGMENT_ATTENTION = "qdoctor_segments"  # the attention implementation of the flat layout


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
    packed: bool  # needs the tree mask (else: a 2D padding mask, one tree per row)
    sequences: int = 1  # distinct model inputs among its requests (what lm-eval's batch counts)


@dataclass
class _Group:
    """Consecutive items ``[start, end)`` of a flat row whose attention is ONE SDPA call.

    Several items: padded to a batch ``[items, heads, length, head_dim]`` — ``index`` gives
    each slot's token in the row (padding: any token of the group), ``valid`` each token's slot
    (``item * length + j``), ``mask`` is ``[items, 1, length, length]`` additive (0 where the
    query may attend the key, −inf elsewhere). One item: its slice of the row, ``index`` and
    ``valid`` None, ``mask`` its tree mask ``[1, 1, n, n]`` or None for plain causal attention."""

    start: int
    end: int
    mask: torch.Tensor | None
    index: torch.Tensor | None = None
    valid: torch.Tensor | None = None


@dataclass
class _Segments:
    """The items of a flat row, in groups; ``calls`` counts the layers that attended with it."""

    groups: list[_Group]
    calls: int = field(default=0)


_ACTIVE_SEGMENTS: ContextVar[_Segments | None] = ContextVar("qdoctor_zeroshot_segments", default=None)


def _segment_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention of a flat row ``[1, heads, N, head_dim]`` made of independent items.

    Each item attends only within itself, under its tree mask. Per group of items, one call
    of transformers' own SDPA attention (``sdpa_attention_forward``: scaling, grouped-query
    heads, causal flag exactly as the model's usual "sdpa") on the items gathered into padded
    rows (or on the row slice, for a group of one); the outputs are gathered back into row
    order. Returns ``([1, N, heads, head_dim], None)`` like ``sdpa_attention_forward``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    segments = _ACTIVE_SEGMENTS.get()
    if segments is None or query.shape[0] != 1 or key.shape[2] != query.shape[2]:
        raise QDoctorError(f"the '{SEGMENT_ATTENTION}' attention only runs inside LoglikelihoodScorer")
    segments.calls += 1
    outs = []
    for g in segments.groups:
        if g.mask is not None and g.mask.dtype != query.dtype:
            g.mask = g.mask.to(query.dtype)  # once per forward, in its first layer
        if g.index is None:
            out, _ = sdpa_attention_forward(module, query[:, :, g.start:g.end], key[:, :, g.start:g.end],
                                            value[:, :, g.start:g.end], g.mask, **kwargs)
        else:  # [1, h, N, d] → [items, h, length, d], attend, back to [1, tokens, h, d]
            q, k, v = (x[0][:, g.index].transpose(0, 1) for x in (query, key, value))
            out, _ = sdpa_attention_forward(module, q, k, v, g.mask, **kwargs)
            out = out.reshape(-1, *out.shape[2:])[g.valid][None]
        outs.append(out)
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)), None


def _register_segment_attention() -> bool:
    """Register ``_segment_attention`` with transformers' AttentionInterface; False if impossible.

    The name has no mask function registered, so transformers builds no mask for it."""
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: F401
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    except ImportError:
        return False
    if SEGMENT_ATTENTION in ALL_MASK_ATTENTION_FUNCTIONS:
        return False
    AttentionInterface.register(SEGMENT_ATTENTION, _segment_attention)
    return True


def _common_prefix(seqs: list[list[int]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return n


def _tree_masks(branches: torch.Tensor) -> torch.Tensor:
    """``[rows, 1, L, L]`` bool from per-token branch ids ``[rows, L]`` (one item per row, PAD
    after it): causal, and the key is prefix or on the query's own branch. Padding queries see
    earlier padding (finite, never read); nothing else sees padding."""
    n = branches.shape[1]
    br_q, br_k = branches[:, :, None], branches[:, None, :]
    causal = torch.ones(n, n, dtype=torch.bool).tril_()
    return (causal[None] & ((br_k == PREFIX) | (br_k == br_q)))[:, None]


def _token_scores(logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each scored token k — row ``rows[k]`` of ``logits [U, vocab]`` (float32, overwritten;
    several tokens may share a row) and target ``targets[k]`` — ``log p(target)`` (float64) and
    whether the target is the row's ``argmax()`` (its first maximum, as lm-eval's argmax).

    log p(target) = logit[target] − logsumexp(row), logsumexp computed as torch computes it
    (max-shifted sum of exponentials), once per row and in place. Greedy without a full argmax
    (an unvectorized pass on CPU): a target is the argmax iff it equals the row maximum and
    the row's maximum without it (the runner-up) is smaller; rows where the maximum is tied
    (runner-up equal, or two different targets at the maximum) are settled by ``argmax``."""
    target_logit = logits[rows, targets]
    top = logits.amax(dim=-1)
    candidate = target_logit == top[rows]
    cand_rows, cand_targets = rows[candidate], targets[candidate]
    logits[cand_rows, cand_targets] = float("-inf")
    runner_up = logits.amax(dim=-1)
    logits[cand_rows, cand_targets] = target_logit[candidate]  # restored
    greedy = candidate & (runner_up[rows] < top[rows])
    chosen = torch.full_like(top, -1, dtype=torch.long)
    chosen[cand_rows] = cand_targets  # one of the row's maximal targets
    tied = (chosen[cand_rows] != cand_targets) | (runner_up[cand_rows] >= top[cand_rows])
    unsure = torch.zeros_like(chosen).index_add_(0, cand_rows, tied.long()) > 0  # any tie in the row
    if unsure.any():
        check = candidate & unsure[rows]
        greedy[check] = logits[rows[check]].argmax(dim=-1) == targets[check]
    shift = top.masked_fill(top.abs() == float("inf"), 0.0)  # as torch.logsumexp
    lse = logits.sub_(shift[:, None]).exp_().sum(dim=-1).log_().add_(shift)
    return (target_logit - lse[rows]).double(), greedy


def _last_mlp(model) -> torch.nn.Module | None:
    """The MLP of the model's last decoder layer (``get_decoder().layers[-1].mlp``), if any."""
    try:
        mlp = model.get_decoder().layers[-1].mlp
    except (AttributeError, IndexError, TypeError):
        return None
    return mlp if isinstance(mlp, torch.nn.Module) else None


def _rows_only(module: torch.nn.Module | None, shape: tuple[int, int], rows: torch.Tensor, cols: torch.Tensor):
    """Hooks that run ``module`` (position-wise) only at ``(rows, cols)`` of its ``[*shape, d]``
    input and return zeros elsewhere; a list of their handles (empty without a module)."""
    if module is None:
        return []
    full: list[torch.Size] = []

    def gather(mod, args):
        if args and args[0].dim() == 3 and tuple(args[0].shape[:2]) == shape and not full:
            full.append(args[0].shape)
            return (args[0][rows, cols][None],) + tuple(args[1:])
        return None

    def scatter(mod, args, output):
        if not full:
            return None
        out = output[0] if isinstance(output, tuple) else output
        if not (isinstance(out, torch.Tensor) and out.shape[:2] == (1, rows.numel())):
            raise QDoctorError(f"unexpected output {type(out).__name__} of the last MLP")
        whole = out.new_zeros(full[0][:2] + out.shape[2:])
        whole[rows, cols] = out[0]
        return (whole,) + tuple(output[1:]) if isinstance(output, tuple) else whole

    return [module.register_forward_pre_hook(gather), module.register_forward_hook(scatter)]


class _SegmentsUnsupported(Exception):
    """The model's layers did not all run the segment attention: use the row layout instead."""


class LoglikelihoodScorer:
    """``score(items)``: (log-likelihood, is_greedy) of every (context, continuation) request.

    batch_size: distinct input sequences per forward, as lm-eval's HFLM batch (an item is
    never split). max_length: the model's context; longer requests are cut from the left.
    share_prefix: an item's requests as one tree (exact); off, every request is its own
    sequence. pad_id: the token id of padding (row layout)."""

    def __init__(self, model, batch_size: int = 16, max_length: int = 2048, share_prefix: bool = True,
                 pad_id: int = 0, progress: bool = True):
        if batch_size < 1:
            raise QDoctorError(f"batch_size must be at least 1, got {batch_size}")
        require_resident(model, "zero-shot scoring")  # variable-length requests run the whole model
        self.model = model
        self.batch_size = batch_size
        self.max_length = max_length
        self.pad_id = pad_id
        self.progress = progress
        config = getattr(model, "config", None)
        attn = getattr(config, "_attn_implementation", None)
        self.mask_kind = {"sdpa": "bool", "eager": "float"}.get(attn)
        params = inspect.signature(model.forward).parameters
        self.share_prefix = (share_prefix and self.mask_kind is not None and "position_ids" in params
                             and not getattr(config, "is_encoder_decoder", False))
        self.forward_kwargs = {"use_cache": False} if "use_cache" in params else {}
        window = getattr(config, "sliding_window", None)
        self.window = window if isinstance(window, int) and getattr(config, "use_sliding_window", True) else None
        # The flat layout: a plain decoder (one config, every layer attention) with "sdpa".
        self.n_layers = getattr(config, "num_hidden_layers", None)
        layer_types = getattr(config, "layer_types", None) or ()
        self.flat = (self.share_prefix and attn == "sdpa" and not getattr(config, "sub_configs", None)
                     and isinstance(self.n_layers, int) and self.n_layers > 0
                     and all(t in ("full_attention", "sliding_attention") for t in layer_types)
                     and _register_segment_attention())
        self.attention_budget = 1 << 22  # mask entries per attention call of the flat layout
        self.alone_from = 96  # items longer than this (tokens) get an attention call of their own
        self.last_mlp = _last_mlp(model) if self.flat else None
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
            return [_Tree(tokens, positions, branches, scored, targets, item, 0, packed=True,
                          sequences=len({tuple(x) for x in inputs}))]
        return [_Tree(x, list(range(len(x))), [0] * len(x), [list(range(f, f + len(t)))], [t], item, j, packed=False)
                for j, (x, t, f) in enumerate(zip(inputs, targets, first))]

    def _batches(self, trees: list[_Tree]) -> list[list[list[_Tree]]]:
        """Batches of rows of trees, longest first (as lm-eval: memory peaks early).

        A batch holds at most ``batch_size`` distinct input sequences, counted as lm-eval's
        HFLM counts its batch (it runs requests with the same context + continuation[:-1] as
        one sequence, e.g. BoolQ's " no"/" yes"); an item is never split (an item of more
        sequences than ``batch_size`` is a batch of its own).

        Flat layout: a batch is one row of trees; each tree, longest first, joins the first
        batch with room for it (first-fit decreasing), so batches are as full as lm-eval's and
        no more forwards run than needed. Row layout: batches are consecutive in length order;
        the first tree of a batch sets the row length and later, shorter trees fill rows
        first-fit."""
        trees = sorted(trees, key=lambda t: (t.packed, -len(t.tokens)))
        batches: list[list[list[_Tree]]] = []
        flat = [t for t in trees if t.packed and self.flat]
        room: list[int] = []  # sequences left in each flat batch
        for tree in flat:
            slot = next((i for i, r in enumerate(room) if r >= tree.sequences), None)
            if slot is None:
                batches.append([[tree]])
                room.append(self.batch_size - tree.sequences)
            else:
                batches[slot][0].append(tree)
                room[slot] -= tree.sequences
        rows: list[list[_Tree]] = []
        free: list[int] = []  # room left in each row of the open batch
        n_requests, width = 0, 0
        for tree in [t for t in trees if not (t.packed and self.flat)]:
            n, size = tree.sequences, len(tree.tokens)
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
    def _inputs(self, rows: list[list[_Tree]]) -> tuple[dict, _Segments | None]:
        """Model inputs of a batch, and the segments of a flat row (else None)."""
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
            return {"input_ids": ids.to(self.device), "attention_mask": (branches != PAD).long().to(self.device)}, None
        if self.flat:  # one row, no padding; attention item by item, in groups
            groups, start = [], 0
            for group in self._attention_groups(rows[0]):
                end = start + sum(len(t.tokens) for t in group)
                groups.append(self._group(group, start, end))
                start = end
            return {"input_ids": ids.to(self.device), "position_ids": positions.to(self.device)}, _Segments(groups)
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
                "position_ids": positions.to(self.device)}, None

    def _attention_groups(self, trees: list[_Tree]) -> list[list[_Tree]]:
        """Runs of consecutive items attended by one SDPA call each. An item longer than
        ``alone_from`` tokens is attended alone (unpadded, and causal attention skips the
        masked half); shorter ones share a call, whose fixed cost dominates for them, as many
        as fit in ``attention_budget`` mask entries (items × longest² of the run)."""
        groups: list[list[_Tree]] = []
        longest = self.alone_from + 1  # no run open
        for t in trees:
            n = len(t.tokens)
            if (n <= self.alone_from and longest <= self.alone_from
                    and (len(groups[-1]) + 1) * max(longest, n) ** 2 <= self.attention_budget):
                groups[-1].append(t)
                longest = max(longest, n)
            else:
                groups.append([t])
                longest = n
        return groups

    def _group(self, trees: list[_Tree], start: int, end: int) -> _Group:
        """The attention inputs of ``trees``, which occupy tokens ``[start, end)`` of the flat row."""
        if len(trees) == 1:
            (t,) = trees
            plain = len(set(t.branches) - {PREFIX}) <= 1  # prefix + at most one branch: causal
            mask = None if plain else self._additive(_tree_masks(torch.tensor([t.branches])))
            return _Group(start, end, mask)
        length = max(len(t.tokens) for t in trees)
        index = torch.full((len(trees), length), start, dtype=torch.long)
        branches = torch.full((len(trees), length), PAD, dtype=torch.long)
        valid, offset = [], start
        for i, t in enumerate(trees):
            n = len(t.tokens)
            index[i, :n] = torch.arange(offset, offset + n)
            branches[i, :n] = torch.tensor(t.branches)
            valid.append(torch.arange(i * length, i * length + n))
            offset += n
        return _Group(start, end, self._additive(_tree_masks(branches)), index.to(self.device),
                      torch.cat(valid).to(self.device))

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """A bool mask as SDPA's additive float mask (0 / −inf): converted once per forward
        instead of by SDPA in every layer (and cast to the attention's dtype on first use)."""
        mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill_(~allowed, float("-inf"))
        return mask.to(self.device)

    @contextmanager
    def _attention(self, segments: _Segments | None):
        """While active (flat row): the model's config names the segment attention."""
        if segments is None:
            yield
            return
        config = self.model.config
        previous = config._attn_implementation
        token = _ACTIVE_SEGMENTS.set(segments)
        config._attn_implementation = SEGMENT_ATTENTION
        try:
            yield
        finally:
            config._attn_implementation = previous
            _ACTIVE_SEGMENTS.reset(token)

    def _scored_logits(self, kwargs: dict, segments: _Segments | None, rows_t: torch.Tensor,
                       cols_t: torch.Tensor) -> torch.Tensor:
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

        handles = [head.register_forward_pre_hook(gather_scored)] if isinstance(head, torch.nn.Module) else []
        # Only the scored positions of the last layer's output are read (by the head), so its
        # MLP (position-wise) runs on those alone.
        handles += _rows_only(self.last_mlp, (batch, length), rows_t, cols_t) if segments is not None else []
        try:
            with self._attention(segments):
                logits = self.model(**kwargs, **self.forward_kwargs).logits
        finally:
            for handle in handles:
                handle.remove()
        if segments is not None and segments.calls != self.n_layers:
            raise _SegmentsUnsupported(f"{segments.calls} of {self.n_layers} layers ran the segment attention")
        if fired and logits.shape[:2] == (1, rows_t.numel()):
            return logits[0]
        if logits.shape[:2] == (batch, length):  # the head was not called as a module
            return logits[rows_t, cols_t]
        raise QDoctorError(f"unexpected logits shape {tuple(logits.shape)} for input {(batch, length)}")

    @torch.inference_mode()
    def _run_batch(self, rows: list[list[_Tree]]) -> list[tuple[float, bool]]:
        """(loglik, greedy) for every request of ``rows``, in row, tree, request order."""
        kwargs, segments = self._inputs(rows)
        # Scored positions, each once (the choices of an item are all predicted from its last
        # shared position): the LM head and the logsumexp run on these rows only.
        position: dict[tuple[int, int], int] = {}
        which, tgt, owner, lengths = [], [], [], []
        for i, row in enumerate(rows):
            start = 0
            for tree in row:
                for cols, t in zip(tree.scored, tree.targets):
                    which += [position.setdefault((i, start + c), len(position)) for c in cols]
                    tgt += t
                    owner += [len(lengths)] * len(t)
                    lengths.append(len(t))
                start += len(tree.tokens)
        rows_t = torch.tensor([r for r, _ in position], device=self.device)
        cols_t = torch.tensor([c for _, c in position], device=self.device)
        logits = self._scored_logits(kwargs, segments, rows_t, cols_t).float()
        which_t = torch.tensor(which, device=logits.device)
        tgt_t = torch.tensor(tgt, device=logits.device)
        owner_t = torch.tensor(owner, device=logits.device)
        token_lp, greedy = _token_scores(logits, which_t, tgt_t)
        n_req = len(lengths)
        ll = torch.zeros(n_req, dtype=torch.float64, device=logits.device).index_add_(0, owner_t, token_lp)
        n_hit = torch.zeros(n_req, dtype=torch.long, device=logits.device).index_add_(0, owner_t, greedy.long())
        return [(a, b == n) for a, b, n in zip(ll.tolist(), n_hit.tolist(), lengths)]

    def score(self, items: list[list[tuple[list[int], list[int]]]], desc: str = "loglikelihood"
              ) -> list[list[tuple[float, bool]]]:
        """``items[i][j] = (context_tokens, continuation_tokens)`` → ``[(loglik, is_greedy)]`` per item."""
        try:
            return self._score(items, desc)
        except _SegmentsUnsupported as e:
            warnings.warn(f"zero-shot scorer: flat layout unsupported by this model ({e}); using padded rows",
                          stacklevel=2)
            self.flat = False
            return self._score(items, desc)

    def _score(self, items: list[list[tuple[list[int], list[int]]]], desc: str) -> list[list[tuple[float, bool]]]:
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
