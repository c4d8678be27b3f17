"""Availability checks and small shared helpers (no Triton import at module load)."""

from __future__ import annotations

import functools

import torch

from qdoctor.errors import QDoctorError


@functools.cache
def triton_importable() -> bool:
    """True when ``import triton`` works (it is absent from CPU-only installs)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available() -> bool:
    """True when the CUDA/Triton kernels can run: a CUDA device and Triton are present."""
    return torch.cuda.is_available() and triton_importable()


def use_kernels(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` goes to the Triton kernels (CUDA tensor, Triton present)."""
    return x.is_cuda and triton_importable()


def require(condition: bool, message: str) -> None:
    if not condition:
        raise QDoctorError(message)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View x (..., K) as a contiguous (T, K) matrix of rows (copies only if it must)."""
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
