"""Small text renderings shared by reports, cards and summaries."""

from __future__ import annotations


def index_ranges(indices, sep: str = ",", dash: str = "-", min_run: int = 2) -> str:
    """Sorted distinct indices as ranges: runs of at least ``min_run`` consecutive numbers become
    ``start{dash}end``, the rest are listed, joined by ``sep``.

    >>> index_ranges([0, 1, 2, 3, 7, 9, 10])
    '0-3,7,9-10'
    >>> index_ranges([0, 1, 2, 3, 7, 9, 10], sep=", ", dash="–", min_run=3)
    '0–3, 7, 9, 10'
    """
    idx = sorted(set(indices))
    out, i = [], 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        out += [f"{idx[i]}{dash}{idx[j]}"] if j - i + 1 >= min_run and j > i else [str(b) for b in idx[i:j + 1]]
        i = j + 1
    return sep.join(out)
