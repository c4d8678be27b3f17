"""Token windows: how text becomes the (N, L) inputs of calibration and evaluation.

A window is L tokens; for models that need <bos> (``models.registry.bos_token_id``) it is
[bos] + (L − 1) text tokens, and all L − 1 text tokens are predicted. Evaluation takes
consecutive non-overlapping windows (the tail shorter than a window is dropped); calibration
takes windows at seeded random offsets (``calib.collect.calibration_windows``).
"""

from __future__ import annotations

import torch

from qdoctor.errors import QDoctorError


def window_body(seqlen: int, bos_id: int | None) -> int:
    """Text tokens per window: L, or L − 1 when <bos> takes the first position."""
    if seqlen < 2:
        raise QDoctorError(f"seqlen must be at least 2, got {seqlen}")
    return seqlen - (1 if bos_id is not None else 0)


def prepend_bos(rows: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    """(N, body) text rows → (N, L) windows, [bos] first where ``bos_id`` is given."""
    if bos_id is None:
        return rows
    return torch.cat([torch.full((rows.shape[0], 1), bos_id, dtype=torch.long), rows], dim=1)


def consecutive_windows(ids: torch.Tensor, seqlen: int, bos_id: int | None = None,
                        max_windows: int | None = None) -> torch.Tensor:
    """(W, seqlen) non-overlapping windows of the token ids ``ids`` (1-D), at most ``max_windows``.
    Fewer tokens than one window is a ``QDoctorError``."""
    body = window_body(seqlen, bos_id)
    n = ids.numel() // body
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise QDoctorError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}; "
                           "use a smaller --seqlen or a longer text")
    return prepend_bos(ids[: n * body].view(n, body), bos_id)
