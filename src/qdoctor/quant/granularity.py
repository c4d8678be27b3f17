"""Granularity: which elements of a tensor share one quantization scale.

Small frozen dataclasses (as in torchao), never strings inside the math.
A weight W has shape (N, K) (out, in); an activation X has shape (..., K).

- ``PerTensor``  one scale for the whole tensor.
- ``PerChannel`` weights: one scale per output row n.
- ``PerToken``   activations: one scale per token row t.
- ``PerGroup(g)`` one scale per row and per block of g consecutive input channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class PerTensor:
    name: str = "tensor"


@dataclass(frozen=True)
class PerChannel:
    name: str = "channel"


@dataclass(frozen=True)
class PerToken:
    name: str = "token"


@dataclass(frozen=True)
class PerGroup:
    group_size: int = 128
    name: str = "group"

    def __post_init__(self):
        if int(self.group_size) <= 0:
            from qdoctor.errors import QDoctorError

            raise QDoctorError(f"group size must be a positive integer, got {self.group_size}")


Granularity = Union[PerTensor, PerChannel, PerToken, PerGroup]


def granularity_from_str(text: str) -> Granularity:
    """Parse ``tensor``, ``channel``, ``token``, ``group`` or ``group:<g>`` / ``group<g>``."""
    from qdoctor.errors import QDoctorError

    t = text.strip().lower()
    if t == "tensor":
        return PerTensor()
    if t == "channel":
        return PerChannel()
    if t == "token":
        return PerToken()
    if t.startswith("group"):
        rest = t[len("group"):].lstrip(":")
        if not rest:
            return PerGroup()
        if not (rest.isascii() and rest.isdigit()):
            raise QDoctorError(f"bad group size in granularity {text!r}: use e.g. group:128")
        return PerGroup(int(rest))
    raise QDoctorError(f"unknown granularity {text!r}: use tensor, channel, token or group:<g>")


def granularity_to_str(g: Granularity) -> str:
    if isinstance(g, PerGroup):
        return f"group:{g.group_size}"
    return g.name
