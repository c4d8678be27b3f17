"""Calibration: run N samples × L tokens through the model and record, per linear input,
the running statistics of ``observers.LinearInputStats``.

Samples are N windows of L consecutive tokens at seeded random offsets in the calibration
text (WikiText-2 validation by default; never the test split).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from qdoctor.calib.observers import LinearInputStats
from qdoctor.calib.text import CALIBRATION_SPLIT, text_source
from qdoctor.errors import QDoctorError
from qdoctor.models.lazy import is_lazy


@dataclass(frozen=True)
class CalibrationConfig:
    n_samples: int = 64
    seqlen: int = 512
    source: str = f"wikitext2:{CALIBRATION_SPLIT}"
    seed: int = 0
    batch_size: int = 4
    sample_rows: int = 0  # token rows kept per layer (for median ranges and output errors)
    holdout_fraction: float = 0.0  # the text's last fraction is reserved for held-out evaluation

    def __post_init__(self):
        if self.n_samples < 1 or self.seqlen < 2 or self.batch_size < 1:
            raise QDoctorError("calibration needs n_samples ≥ 1, seqlen ≥ 2 and batch_size ≥ 1")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise QDoctorError("holdout_fraction must be in [0, 1)")
        if self.source in ("wikitext2:test", "test"):
            raise QDoctorError("calibrating on the WikiText-2 test split would leak the evaluation text; use valid")


@dataclass
class CalibrationStats:
    layers: dict[str, LinearInputStats]
    input_ids: torch.Tensor  # (N, L): the calibration tokens, for spike positions/token ids
    config: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __getitem__(self, name: str) -> LinearInputStats:
        try:
            return self.layers[name]
        except KeyError:
            raise QDoctorError(f"no calibration statistics for layer {name!r}") from None

    def act_absmax(self, name: str, observer: str = "absmax") -> float:
        return self[name].observe(observer)


def calibration_token_ids(tokenizer, config: CalibrationConfig, heldout: bool = False) -> torch.Tensor:
    """The tokenized calibration text: its first (1 − holdout_fraction) for calibration, or
    (``heldout=True``) its last ``holdout_fraction`` for held-out evaluation."""
    text = text_source(config.source)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    cut = int(round(ids.numel() * (1.0 - config.holdout_fraction)))
    return ids[cut:] if heldout else ids[:cut]


def calibration_windows(tokenizer, config: CalibrationConfig, bos_id: int | None = None) -> torch.Tensor:
    """(N, L) token windows at seeded random offsets of the tokenized source text.

    With ``bos_id`` (models that need <bos>) each window is [bos] + L−1 text tokens."""
    ids = calibration_token_ids(tokenizer, config)
    body = config.seqlen - (1 if bos_id is not None else 0)
    if ids.numel() < body + 1:
        raise QDoctorError(f"calibration text has {ids.numel()} tokens; need more than {body} for seqlen {config.seqlen}")
    g = torch.Generator().manual_seed(config.seed)
    starts = torch.randint(0, ids.numel() - body, (config.n_samples,), generator=g)
    rows = torch.stack([ids[s:s + body] for s in starts.tolist()])
    if bos_id is not None:
        rows = torch.cat([torch.full((rows.shape[0], 1), bos_id, dtype=torch.long), rows], dim=1)
    return rows


def collect_linear_stats(model: nn.Module, input_ids: torch.Tensor, layer_names: list[str],
                         batch_size: int = 4, desc: str = "calibrating", sample_rows: int = 0,
                         seed: int = 0) -> dict[str, LinearInputStats]:
    """Forward ``input_ids`` (N, L) through ``model`` in batches, with pre-hooks that fold each
    named linear's input into a ``LinearInputStats`` (keeping ``sample_rows`` sampled rows)."""
    modules = dict(model.named_modules())
    stats: dict[str, LinearInputStats] = {}
    handles = []
    for name in layer_names:
        mod = modules.get(name)
        if mod is None:
            raise QDoctorError(f"model has no module {name!r}")
        stats[name] = LinearInputStats(in_features=mod.in_features, sample_rows=sample_rows, seed=seed, name=name)

        def hook(_m, args, _s=stats[name]):
            _s.update(args[0])

        handles.append(mod.register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            if is_lazy(model):  # blocks streamed from their source
                from qdoctor.models.streaming import stream_blocks

                stream_blocks(model, input_ids, lambda i, block, inputs: None, batch_size=batch_size, desc=desc,
                              final_outputs=True)  # the last block runs too
            else:
                for i in tqdm(range(0, input_ids.shape[0], batch_size), desc=desc, unit="batch", leave=False):
                    model(input_ids[i:i + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return stats


def calibrate(model: nn.Module, tokenizer, config: CalibrationConfig | None = None,
              layer_names: list[str] | None = None) -> CalibrationStats:
    """Calibration statistics for every quantizable linear (registry) or ``layer_names``."""
    from qdoctor.models.registry import arch_for, block_linear_names

    config = config or CalibrationConfig()
    arch = arch_for(model)
    names = layer_names or block_linear_names(model, arch)
    from qdoctor.models.loading import check_context

    check_context(model, config.seqlen, "calibration seqlen")
    bos = tokenizer.bos_token_id if arch.needs_bos else None
    ids = calibration_windows(tokenizer, config, bos_id=bos)
    stats = collect_linear_stats(model, ids, names, config.batch_size, sample_rows=config.sample_rows,
                                 seed=config.seed)
    return CalibrationStats(layers=stats, input_ids=ids, config=config)
