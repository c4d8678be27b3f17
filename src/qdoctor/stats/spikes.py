"""Activation-spike statistics from the per-token absmax of a linear input (Maisonnave 2025;
metric of Yang et al. 2024).

With ``token_absmax[i, t] = max_k |X_i[t, k]|`` for calibration sample i and position t:

    spike_ratio = mean_i ( max_t token_absmax[i, t] / median_t token_absmax[i, t] )

A token is a spike when token_absmax[i, t] > k · median_t token_absmax[i, t]
(k = ``DEFAULT_SPIKE_FACTOR`` = 20: a spike dwarfs what per-tensor INT8 can resolve in the
other tokens — at 20× the typical token keeps only ≈ 6 of 127 levels).
"""

from __future__ import annotations

import torch

DEFAULT_SPIKE_FACTOR = 20.0


def _median_per_sample(token_absmax: torch.Tensor) -> torch.Tensor:
    return token_absmax.float().median(dim=-1, keepdim=True).values.clamp_min(1e-12)


def spike_ratio(token_absmax: torch.Tensor) -> float:
    """mean over samples of (max over tokens / median over tokens) of the per-token absmax."""
    ta = token_absmax.float()
    if ta.dim() == 1:
        ta = ta.unsqueeze(0)
    return float((ta.amax(dim=-1, keepdim=True) / _median_per_sample(ta)).mean())


def spike_mask(token_absmax: torch.Tensor, factor: float = DEFAULT_SPIKE_FACTOR) -> torch.Tensor:
    """Boolean (N, L): tokens whose absmax exceeds ``factor`` × their sample's median token absmax."""
    ta = token_absmax.float()
    if ta.dim() == 1:
        ta = ta.unsqueeze(0)
    return ta > factor * _median_per_sample(ta)


def spike_positions(token_absmax: torch.Tensor, factor: float = DEFAULT_SPIKE_FACTOR) -> dict[int, int]:
    """{token position: number of samples in which that position spikes}."""
    mask = spike_mask(token_absmax, factor)
    pos = mask.nonzero()[:, 1]
    counts = torch.bincount(pos, minlength=mask.shape[1]) if pos.numel() else torch.zeros(0, dtype=torch.long)
    return {int(p): int(c) for p, c in enumerate(counts.tolist()) if c}


def spike_token_ids(token_absmax: torch.Tensor, input_ids: torch.Tensor,
                    factor: float = DEFAULT_SPIKE_FACTOR) -> dict[int, int]:
    """{token id: number of spike occurrences} (e.g. the first token, delimiters)."""
    mask = spike_mask(token_absmax, factor)
    ids = input_ids[:, : mask.shape[1]][mask]
    out: dict[int, int] = {}
    for t in ids.tolist():
        out[t] = out.get(t, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def median_token_absmax(token_absmax: torch.Tensor) -> float:
    """The typical token: median over samples of each sample's median token absmax."""
    ta = token_absmax.float()
    if ta.dim() == 1:
        ta = ta.unsqueeze(0)
    return float(_median_per_sample(ta).median())


def token_absmax_by_position(token_absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max over samples, median over samples) of the per-token absmax at each position (L,), (L,)."""
    ta = token_absmax.float()
    if ta.dim() == 1:
        ta = ta.unsqueeze(0)
    return ta.amax(dim=0), ta.median(dim=0).values


def spike_channels(rows: torch.Tensor, k: int = 5) -> list[tuple[int, float]]:
    """The k channels that carry the largest |x| over ``rows`` (e.g. the spike tokens' rows),
    as (channel, max |x|), largest first: a spike is usually a handful of channels."""
    if rows is None or rows.numel() == 0:
        return []
    prof = rows.detach().abs().float().reshape(-1, rows.shape[-1]).amax(dim=0)
    vals, idx = prof.topk(min(k, prof.numel()))
    return [(int(i), float(v)) for i, v in zip(idx, vals)]
