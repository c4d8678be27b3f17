"""Weight-outlier statistics of one linear layer, W ∈ ℝ^{N×K} (Qin 2024, §3).

Llama-3-70B's signature: a few *input* dimensions j of the first blocks' q/k/v/gate/up hold
|W[n, j]| > 90 while the rest of the matrix is ≈ 1, so a per-output-row scale is set by
that one column.
"""

from __future__ import annotations

import torch


def input_dim_absmax(w: torch.Tensor) -> torch.Tensor:
    """p[j] = max_n |W[n, j]|, the per-input-dimension absmax profile (K,)."""
    return w.detach().abs().amax(dim=0).float()  # max is exact in any dtype: no fp32 copy of W


def top_outlier_dims(w: torch.Tensor, k: int = 5) -> list[tuple[int, float]]:
    """The k input dimensions with the largest |W| (index, value), largest first."""
    prof = input_dim_absmax(w)
    vals, idx = prof.topk(min(k, prof.numel()))
    return [(int(i), float(v)) for i, v in zip(idx, vals)]


def max_median_ratio(w: torch.Tensor) -> float:
    """max_j p[j] / median_j p[j]: how far the worst input dimension sits above a typical one."""
    prof = input_dim_absmax(w)
    med = float(prof.median())
    return float(prof.max()) / med if med > 0 else float("inf")


def median_dim_absmax(w: torch.Tensor) -> float:
    """median_j p[j]: the typical input dimension's absmax (the denominator of ``max_median_ratio``)."""
    return float(input_dim_absmax(w).median())
