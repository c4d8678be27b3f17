"""Running statistics of linear-layer inputs, and the observers that turn them into scales.

Per linear input X (tokens × K channels) we keep, as running reductions (never the activations):

- ``channel_absmax[k] = max_t |X[t, k]|``                       (K floats)
- ``token_absmax[i, t] = max_k |X_i[t, k]|`` for sample i, position t  (N × L floats)
- optionally ``rows``: a uniform random sample of at most ``sample_rows`` token rows of X
  (priority sampling: every row gets a seeded uniform key, the largest keys are kept), for
  statistics that need values rather than maxima (median ranges, output errors).

Everything the static-scale observers, spike detection and smoothing need derives from these.
Observers are registered by name (``absmax``, ``percentile``, ``mse``) and map stats (and the
activation spec: its dtype sets the rounding the ``mse`` search measures) → absmax a; the static
scale is then s = a / qmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from qdoctor.distributed import World, top_keys
from qdoctor.errors import QDoctorError
from qdoctor.quant.fake import clip_error, clip_search
from qdoctor.quant.granularity import PerTensor
from qdoctor.quant.spec import QuantSpec, percentile_of

ObserverFn = Callable[["LinearInputStats", str, QuantSpec], float]
OBSERVERS: dict[str, ObserverFn] = {}
# what each observer reads beyond the channel maxima: the per-token maxima (stale after smoothing,
# so a smoothed plan recalibrates for them) or the sampled rows (calibrate with sample_rows > 0)
NEEDS_TOKEN_MAXIMA = frozenset({"percentile"})
NEEDS_ROWS = frozenset({"mse"})
DEFAULT_ACT_SPEC = QuantSpec("int8", PerTensor())


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
    sample_rows: int = 0
    seed: int = 0
    rows: torch.Tensor | None = None  # (≤ sample_rows, K) sampled token rows, in the activations' dtype
    _row_keys: torch.Tensor | None = None
    _gen: torch.Generator | None = None
    name: str = ""  # the layer's full name, for error messages
    row_offset: int = 0  # rows seen before this process's first (a rank's shard: ``qdoctor.distributed``)
    _observed: dict = field(default_factory=dict)  # (observer, dtype) → a; layers sharing an input ask once


    def __post_init__(self):
        if self.channel_absmax is None:
            self.channel_absmax = torch.zeros(self.in_features, dtype=torch.float32)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """Fold a batch X of shape (B, L, K) (or (L, K)) into the running statistics; returns
        the batch's per-token maxima (B, L) on the CPU. Maxima are taken in X's own dtype (exact)
        where X is, so no fp32 copy of the activations is made."""
        ax = x.detach().abs()
        if ax.dim() == 2:
            ax = ax.unsqueeze(0)
        ax = ax.reshape(-1, ax.shape[-2], ax.shape[-1])
        batch_max = ax.amax(dim=(0, 1)).float().cpu()  # NaN propagates through amax: one check over K floats
        check_finite_input(batch_max, self.name)
        self.channel_absmax = torch.maximum(self.channel_absmax, batch_max)
        tok = ax.amax(dim=-1).float().cpu()
        del ax
        self._token_rows.append(tok)
        self._token_absmax = None
        self._observed = {}
        if self.sample_rows > 0:
            self._sample(x.detach().reshape(-1, x.shape[-1]))
        return tok

    def _sample(self, flat: torch.Tensor) -> None:
        """Keep the ``sample_rows`` rows with the largest seeded uniform keys (a uniform sample
        without replacement over every row seen; equal keys: the earlier row, ``top_keys``). Row r
        (counted from the first calibration window, ``row_offset`` included) gets the r-th key of
        the seeded generator, so a rank's shard draws the keys one process would. Keys are drawn
        on the CPU; only the rows that enter the sample are copied off ``flat``'s device."""
        if self._gen is None:
            self._gen = seeded_generator(self.seed, skip=self.row_offset)
        new_keys = torch.rand(flat.shape[0], generator=self._gen)
        n_old = 0 if self.rows is None else self.rows.shape[0]
        keys = new_keys if self.rows is None else torch.cat([self._row_keys, new_keys])
        top = top_keys(keys, self.sample_rows)
        # kept in the input's own dtype (bf16 activations stay bf16: lossless, half the host memory)
        new_rows = flat[(top[top >= n_old] - n_old).to(flat.device)].cpu()
        self.rows = new_rows if n_old == 0 else torch.cat([self.rows[top[top < n_old]], new_rows])
        self._row_keys = keys[top]

    def rescale_channels(self, inv_scale: torch.Tensor) -> None:
        """The statistics of X · diag(inv_scale) (after smoothing divides channel j by S_j):
        channel absmax and sampled rows are exact; per-token maxima are recomputed from
        the rows only where possible, so they are marked stale."""
        inv = inv_scale.float().cpu()
        self.channel_absmax = self.channel_absmax * inv
        if self.rows is not None:
            self.rows = self.rows * inv
        self._token_rows = []
        self._token_absmax = None
        self._observed = {}
        self.stale_tokens = True

    stale_tokens: bool = False

    @property
    def token_absmax(self) -> torch.Tensor:
        """(N, L) per-token max |x| over channels."""
        if self.stale_tokens:
            raise QDoctorError("per-token statistics are stale after smoothing: recalibrate the smoothed model")
        if self._token_absmax is None:
            if not self._token_rows:
                raise QDoctorError("no calibration data reached this layer")
            self._token_absmax = torch.cat(self._token_rows, dim=0)
            self._token_rows = [self._token_absmax]
        return self._token_absmax

    def channel_median(self) -> torch.Tensor:
        """median_t |X[t, j]| per channel j, over the sampled rows."""
        if self.rows is None:
            raise QDoctorError("median statistics need sampled rows (calibrate with sample_rows > 0)")
        return self.rows.abs().median(dim=0).values

    @property
    def tensor_absmax(self) -> float:
        return float(self.channel_absmax.max())

    def observe(self, observer: str, spec: QuantSpec = DEFAULT_ACT_SPEC) -> float:
        """The absmax a chosen by ``observer`` (``absmax``, ``percentile:<p>`` or ``mse``) for
        activations quantized per ``spec`` (per-tensor static)."""
        kind, _, arg = observer.partition(":")
        try:
            fn = OBSERVERS[kind]
        except KeyError:
            raise QDoctorError(f"unknown observer {observer!r}; known: {', '.join(OBSERVERS)}") from None
        key = (observer, spec.dtype)
        if key not in self._observed:
            self._observed[key] = fn(self, arg, spec)
        return self._observed[key]

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.channel_absmax": self.channel_absmax.contiguous(),
                f"{prefix}.token_absmax": self.token_absmax.contiguous()}

    @classmethod
    def from_tensors(cls, channel_absmax: torch.Tensor, token_absmax: torch.Tensor) -> "LinearInputStats":
        s = cls(in_features=channel_absmax.numel(), channel_absmax=channel_absmax.float())
        s._token_rows = [token_absmax.float()]
        return s


def seeded_generator(seed: int, skip: int = 0) -> torch.Generator:
    """A CPU generator seeded with ``seed`` that has drawn ``skip`` uniform floats already (the
    CPU generator draws one value per element: ``rand(a)`` then ``rand(b)`` = ``rand(a + b)``)."""
    g = torch.Generator().manual_seed(seed)
    for start in range(0, skip, _SKIP_CHUNK):
        torch.rand(min(_SKIP_CHUNK, skip - start), generator=g)
    return g


_SKIP_CHUNK = 1 << 22


def reduce_over_ranks(stats: "list[LinearInputStats]", world: World) -> None:
    """The statistics of every rank's shard of windows together, in place (identity for one
    process): channel maxima by an all-reduce MAX, per-token maxima gathered in rank (= window)
    order, sampled rows as the ``top_keys`` of every rank's candidates — what one process that
    saw every window keeps (``qdoctor.distributed``). One collective of each kind for the list."""
    if not world.distributed or not stats:
        return
    sizes = [st.channel_absmax.numel() for st in stats]
    maxima = world.all_max(torch.cat([st.channel_absmax for st in stats])).split(sizes)
    parts = world.gather([(st._token_rows, st.rows, st._row_keys) for st in stats])
    for j, st in enumerate(stats):
        st.channel_absmax = maxima[j].clone()
        st._token_rows = [t for part in parts for t in part[j][0]]
        st._token_absmax = None
        st._observed = {}
        sampled = [part[j] for part in parts if part[j][1] is not None]
        if st.sample_rows > 0 and sampled:
            keys = torch.cat([p[2] for p in sampled])
            top = top_keys(keys, st.sample_rows)
            st.rows = torch.cat([p[1] for p in sampled])[top]
            st._row_keys = keys[top]


def check_finite_input(channel_max: torch.Tensor, name: str) -> None:
    """Raise a ``QDoctorError`` naming the layer (and its block) when a calibration input holds
    NaN/Inf (``channel_max``: per-channel max |x| of one batch, where NaN/Inf propagate)."""
    if bool(torch.isfinite(channel_max).all()):
        return
    parts = name.split(".")
    block = next((f" (block {parts[i + 1]})" for i, p in enumerate(parts[:-1])
                  if p in ("layers", "h", "blocks") and parts[i + 1].isdigit()), "")
    n_nan = int(torch.isnan(channel_max).sum())
    n_inf = int(torch.isinf(channel_max).sum())
    what = " and ".join(w for w in (f"NaN in {n_nan}" if n_nan else "", f"Inf in {n_inf}" if n_inf else "") if w)
    raise QDoctorError(f"calibration: the input of layer {name or '<unnamed>'}{block} holds {what} of its "
                       f"{channel_max.numel()} channels; the model overflows or its weights are broken before this "
                       "layer (try --dtype fp32, or check the checkpoint)")


@register_observer("absmax")
def absmax_observer(stats: LinearInputStats, _arg: str, _spec: QuantSpec) -> float:
    """a = max over all calibration tokens and channels of |x|."""
    return stats.tensor_absmax


@register_observer("percentile")
def percentile_observer(stats: LinearInputStats, arg: str, _spec: QuantSpec) -> float:
    """a = p-th percentile (linear interpolation) of the per-token absmax values.

    Clips the rare spike tokens: tokens above a are saturated to ±qmax·s."""
    p = percentile_of(f"percentile:{arg}")
    t = stats.token_absmax.flatten()
    return float(torch.quantile(t, p / 100.0)) if t.numel() <= 16_000_000 else float(
        torch.kthvalue(t, max(1, int(round(p / 100.0 * t.numel()))))[0])


def sampled_clip_error(rows: torch.Tensor, spec: QuantSpec, amax: torch.Tensor,
                       token_absmax: torch.Tensor | None = None) -> torch.Tensor:
    """Estimate of E(a) = Σ_{all N calibration tokens t} ‖x_t − D(Q(x_t; a/qmax))‖² from n sampled rows:

        E(a) ≈ (N/n)·Σ_{r in sample} [‖r − D(Q(r))‖² − (max|r| − a)₊²]  +  Σ_{t ≤ N} (m_t − a)₊²

    with m_t the exact per-token maxima (``token_absmax``, N values). The clipping error of each
    token's largest element, (m_t − a)₊² (it saturates to ±a exactly), is counted exactly for every
    token — the rare spike tokens a uniform sample misses are where that term lives — and only
    the rest is estimated from the sample (unbiased: the sample is uniform). Without
    ``token_absmax`` (stale after smoothing), or when the sample holds every row, it is the plain
    sum over the rows Σ_r ‖r − D(Q(r))‖² (the exact E when n = N)."""
    err = clip_error(rows, spec, amax)
    n = rows.shape[0]
    if token_absmax is None or token_absmax.numel() <= n:
        return err
    top_sampled = (rows.abs().amax(dim=-1).float() - amax).clamp_min(0).square().sum()
    top_all = (token_absmax.float() - amax).clamp_min(0).square().sum()
    return (err - top_sampled) * (token_absmax.numel() / n) + top_all


@register_observer("mse")
def mse_observer(stats: LinearInputStats, arg: str, spec: QuantSpec) -> float:
    """a* = c*·absmax, c* = argmin_{c ∈ CLIP_GRID} E(c·absmax) (``sampled_clip_error``: the
    quantization error of the calibration tokens in ``spec``'s format — INT8 or E4M3 rounding),
    absmax the exact max over every token. Needs the sampled rows (``sample_rows > 0``); uses the
    exact per-token maxima for the spike tokens while they are current (not after smoothing,
    which rescales the rows and channel maxima exactly but not the token maxima)."""
    if arg:
        raise QDoctorError(f"observer 'mse' takes no argument, got 'mse:{arg}'")
    if stats.rows is None or stats.rows.shape[0] == 0:
        raise QDoctorError(f"observer 'mse' needs sampled calibration rows{' of ' + stats.name if stats.name else ''}: "
                           "calibrate with sample_rows > 0")
    amax = torch.tensor(stats.tensor_absmax, dtype=torch.float32)
    if float(amax) == 0.0:
        return 0.0
    rows = stats.rows.float()
    tokens = None if stats.stale_tokens else stats.token_absmax.flatten()
    return float(clip_search(amax, lambda cand: sampled_clip_error(rows, spec, cand, tokens)))
