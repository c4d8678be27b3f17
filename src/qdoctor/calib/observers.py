"""Running statistics of linear-layer inputs, and the observers that turn them into scales.

Per linear input X (tokens × K channels) we keep, as running reductions (never the activations):

- ``channel_absmax[k] = max_t |X[t, k]|``                       (K floats)
- ``token_absmax[i, t] = max_k |X_i[t, k]|`` for sample i, position t  (N × L floats)

Everything the static-scale observers, spike detection and smoothing need derives from these.
Observers are registered by name (``absmax``, ``percentile``) and map stats → absmax a;
the static scale is then s = a / qmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from qdoctor.errors import QDoctorError

ObserverFn = Callable[["LinearInputStats", str], float]
OBSERVERS: dict[str, ObserverFn] = {}


def register_observer(name: str):
    def deco(fn: ObserverFn) -> ObserverFn:
        OBSERVERS[name] = fn
        return fn

    return deco


@dataclass
class LinearInputStats:
    in_features: int
    channel_absmax: torch.Tensor = None
    _token_rows: list = field(default_factory=list)
    _token_absmax: torch.Tensor | None = None

    def __post_init__(self):
        if self.channel_absmax is None:
            self.channel_absmax = torch.zeros(self.in_features, dtype=torch.float32)

    def update(self, x: torch.Tensor) -> None:
        """Fold a batch X of shape (B, L, K) (or (L, K)) into the running statistics."""
        ax = x.detach().abs().float()
        if ax.dim() == 2:
            ax = ax.unsqueeze(0)
        ax = ax.reshape(-1, ax.shape[-2], ax.shape[-1])
        self.channel_absmax = torch.maximum(self.channel_absmax, ax.amax(dim=(0, 1)).cpu())
        self._token_rows.append(ax.amax(dim=-1).cpu())
        self._token_absmax = None

    @property
    def token_absmax(self) -> torch.Tensor:
        """(N, L) per-token max |x| over channels."""
        if self._token_absmax is None:
            if not self._token_rows:
                raise QDoctorError("no calibration data reached this layer")
            self._token_absmax = torch.cat(self._token_rows, dim=0)
            self._token_rows = [self._token_absmax]
        return self._token_absmax

    @property
    def tensor_absmax(self) -> float:
        return float(self.channel_absmax.max())

    def observe(self, observer: str) -> float:
        """The absmax a chosen by ``observer`` (``absmax`` or ``percentile:<p>``)."""
        kind, _, arg = observer.partition(":")
        try:
            fn = OBSERVERS[kind]
        except KeyError:
            raise QDoctorError(f"unknown observer {observer!r}; known: {', '.join(OBSERVERS)}") from None
        return fn(self, arg)

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.channel_absmax": self.channel_absmax.contiguous(),
                f"{prefix}.token_absmax": self.token_absmax.contiguous()}

    @classmethod
    def from_tensors(cls, channel_absmax: torch.Tensor, token_absmax: torch.Tensor) -> "LinearInputStats":
        s = cls(in_features=channel_absmax.numel(), channel_absmax=channel_absmax.float())
        s._token_rows = [token_absmax.float()]
        return s


@register_observer("absmax")
def absmax_observer(stats: LinearInputStats, _arg: str) -> float:
    """a = max over all calibration tokens and channels of |x|."""
    return stats.tensor_absmax


@register_observer("percentile")
def percentile_observer(stats: LinearInputStats, arg: str) -> float:
    """a = p-th percentile (linear interpolation) of the per-token absmax values.

    Clips the rare spike tokens: tokens above a are saturated to ±qmax·s."""
    from qdoctor.quant.spec import percentile_of

    p = percentile_of(f"percentile:{arg}")
    t = stats.token_absmax.flatten()
    return float(torch.quantile(t, p / 100.0)) if t.numel() <= 16_000_000 else float(
        torch.kthvalue(t, max(1, int(round(p / 100.0 * t.numel()))))[0])
