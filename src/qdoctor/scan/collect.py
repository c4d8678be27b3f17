"""Per-linear-input recording during a streamed block forward (one block at a time).

An ``InputRecorder`` is a forward pre-hook on one linear layer; it *is* the calibration
recorder (``calib.observers.LinearInputStats``: ``channel_absmax``, ``token_absmax`` and the
uniform ``sample_rows`` sample, by the same code, so the scan's statistics are the calibration
statistics) and adds, for every batch X (B, L, K) of whole calibration samples:

- the rows of the **error subsample**, a stratified sample of tokens:
  * every *spike* token — token absmax > ``spike_factor`` × the median token absmax of its
    sample — up to ``max_spike_rows`` (beyond that a seeded uniform subset of them);
  * the non-spike tokens among a fixed, seeded uniform sample of ``error_tokens`` positions
    (the same positions for every layer).
  ``row_weights()`` weights each row by (tokens of its stratum) / (rows kept of its stratum),
  so weighted sums of squares over the subsample are unbiased estimates of the full-set sums:
  the spike tokens that dominate per-tensor scales are always present, and yet they do not
  count more than they do in the calibration set.
"""

from __future__ import annotations

import torch

from qdoctor.calib.observers import LinearInputStats


def uniform_token_mask(n_samples: int, seqlen: int, n_tokens: int, seed: int) -> torch.Tensor:
    """Boolean (N, L): ``n_tokens`` positions drawn uniformly without replacement (seeded)."""
    total = n_samples * seqlen
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(total, dtype=torch.bool)
    mask[torch.randperm(total, generator=g)[: min(n_tokens, total)]] = True
    return mask.view(n_samples, seqlen)


class InputRecorder(LinearInputStats):
    """Forward pre-hook: the calibration statistics of one linear input (``LinearInputStats``,
    with ``sample_rows`` uniform rows seeded by ``rows_seed``) plus the scan's error subsample."""

    def __init__(self, in_features: int, uniform_mask: torch.Tensor, spike_factor: float,
                 max_spike_rows: int, seed: int = 0, sample_rows: int = 0, rows_seed: int = 0, name: str = ""):
        super().__init__(in_features=in_features, sample_rows=sample_rows, seed=rows_seed, name=name)
        self.uniform_mask = uniform_mask
        self.spike_factor = spike_factor
        self.max_spike_rows = max_spike_rows
        self.samples_seen = 0
        # Non-spike rows of the uniform sample.
        self._u_rows: list[torch.Tensor] = []
        self._u_sample: list[torch.Tensor] = []
        self.nonspike_tokens = 0
        # Spike rows (priority sample when more than max_spike_rows).
        self._s_rows: torch.Tensor | None = None
        self._s_sample: torch.Tensor | None = None
        self._s_keys: torch.Tensor | None = None
        self.spike_tokens = 0
        self._spike_gen = torch.Generator().manual_seed(seed + 1)
        self.last_input: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, _module, args) -> None:
        self.last_input = args[0]  # consumers sharing this input check identity against it
        self.update(args[0])

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """``LinearInputStats.update``, then the error subsample of the batch."""
        tok = super().update(x)  # (B, L) per-token maxima of this batch
        x = x.detach()
        if x.dim() == 2:
            x = x.unsqueeze(0)
        # Reductions run where x is (the GPU for big models); only the selected rows come to the CPU.
        x = x.reshape(-1, x.shape[-2], x.shape[-1])
        b, l, k = x.shape
        s0 = self.samples_seen
        self.samples_seen += b
        median = tok.median(dim=-1, keepdim=True).values.clamp_min(1e-12)
        spike = tok > self.spike_factor * median
        sample_idx = torch.arange(s0, s0 + b).view(b, 1).expand(b, l)
        umask = self.uniform_mask[s0:s0 + b, :l] & ~spike
        self.nonspike_tokens += int((~spike).sum())
        self._u_rows.append(x[umask.to(x.device)].float().cpu())
        self._u_sample.append(sample_idx[umask])
        n_spike = int(spike.sum())
        if n_spike and self.max_spike_rows > 0:
            self.spike_tokens += n_spike
            rows, samp = x[spike.to(x.device)].float().cpu(), sample_idx[spike]
            keys = torch.rand(n_spike, generator=self._spike_gen)
            if self._s_rows is not None:
                rows = torch.cat([self._s_rows, rows])
                samp = torch.cat([self._s_sample, samp])
                keys = torch.cat([self._s_keys, keys])
            if keys.numel() > self.max_spike_rows:
                top = keys.topk(self.max_spike_rows).indices
                rows, samp, keys = rows[top], samp[top], keys[top]
            self._s_rows, self._s_sample, self._s_keys = rows, samp, keys
        elif n_spike:
            self.spike_tokens += n_spike

    def spike_rows(self) -> torch.Tensor:
        return self._s_rows if self._s_rows is not None else torch.zeros(0, self.in_features)

    def error_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows (T, K), sample index (T,), row weight (T,), is-spike flag (T,)) of the error
        subsample: the uniform non-spike rows first, then the spike rows."""
        u_rows = torch.cat(self._u_rows) if self._u_rows else torch.zeros(0, self.in_features)
        u_samp = torch.cat(self._u_sample) if self._u_sample else torch.zeros(0, dtype=torch.long)
        s_rows, s_samp = self.spike_rows(), (self._s_sample if self._s_sample is not None
                                             else torch.zeros(0, dtype=torch.long))
        u_w = self.nonspike_tokens / max(1, u_rows.shape[0])
        s_w = self.spike_tokens / max(1, s_rows.shape[0])
        weights = torch.cat([torch.full((u_rows.shape[0],), float(u_w)), torch.full((s_rows.shape[0],), float(s_w))])
        is_spike = torch.cat([torch.zeros(u_rows.shape[0], dtype=torch.bool), torch.ones(s_rows.shape[0], dtype=torch.bool)])
        return torch.cat([u_rows, s_rows]), torch.cat([u_samp, s_samp]), weights, is_spike

    def to_linear_input_stats(self) -> LinearInputStats:
        """The calibration statistics alone (``qdoctor.quantize``, smoothing, the plan search),
        without the error subsample."""
        out = LinearInputStats.from_tensors(self.channel_absmax, self.token_absmax)
        out.sample_rows, out.seed, out.rows = self.sample_rows, self.seed, self.rows
        return out


class SharedInputCheck:
    """Pre-hook on a consumer that shares ``owner``'s input (another consumer of the same norm):
    it records nothing, only checks that the tensor really is the one the owner recorded."""

    def __init__(self, owner: InputRecorder, name: str):
        self.owner, self.name = owner, name

    def __call__(self, _module, args) -> None:
        if args[0] is not self.owner.last_input:
            from qdoctor.errors import QDoctorError

            raise QDoctorError(f"{self.name}: its input is not the tensor its norm pair's other consumers see; "
                               "the architecture registry entry is wrong for this model")
