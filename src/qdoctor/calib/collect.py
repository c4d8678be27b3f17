"""Calibration: run N samples × L tokens through the model and record, per linear input,
the running statistics of ``observers.LinearInputStats``.

Samples are N windows of L consecutive tokens at seeded random offsets in the calibration
text (WikiText-2 validation by default; never the test split).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from qdoctor.calib.observers import DEFAULT_ACT_SPEC, LinearInputStats, reduce_over_ranks
from qdoctor.calib.text import CALIBRATION_SPLIT, text_source
from qdoctor.calib.windows import prepend_bos, window_body
from qdoctor.distributed import World, current_world
from qdoctor.errors import QDoctorError
from qdoctor.io import atomic_path
from qdoctor.models.loading import check_context
from qdoctor.models.registry import arch_for, block_linear_names, bos_token_id
from qdoctor.models.streaming import stream_blocks
from qdoctor.quant.spec import QuantSpec


STATS_VERSION = 1  # of the saved statistics file (CalibrationStats.save)


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
    basis: str = ""  # the transform the activations were recorded under ("" none; ``RotationStep.basis``)

    def __getitem__(self, name: str) -> LinearInputStats:
        try:
            return self.layers[name]
        except KeyError:
            raise QDoctorError(f"no calibration statistics for layer {name!r}") from None

    def act_absmax(self, name: str, observer: str = "absmax", spec: QuantSpec = DEFAULT_ACT_SPEC) -> float:
        return self[name].observe(observer, spec)

    def save(self, path: str) -> None:
        """Write the statistics to one safetensors file, atomically: per recording layer (layers
        that share an input share one) its channel maxima, per-token maxima and sampled rows;
        the calibration windows; in the metadata the config and which layer records for which."""
        from safetensors.torch import save_file

        owners: dict[int, str] = {}
        layers = {name: owners.setdefault(id(st), name) for name, st in self.layers.items()}
        tensors = {"input_ids": self.input_ids.contiguous()}
        for name, owner in layers.items():
            if name == owner:
                st = self.layers[name]
                tensors.update(st.to_tensors(name))
                if st.rows is not None:
                    tensors[f"{name}.rows"] = st.rows.contiguous()
        meta = {"qdoctor_stats": str(STATS_VERSION), "config": json.dumps(asdict(self.config)),
                "layers": json.dumps(layers), "basis": self.basis}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=meta)

    @classmethod
    def load(cls, path: str) -> "CalibrationStats":
        """The statistics ``save`` wrote (never unpickles: safetensors and JSON only)."""
        from safetensors import SafetensorError, safe_open

        if not Path(path).is_file():
            raise QDoctorError(f"{path}: no such statistics file")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("qdoctor_stats") != str(STATS_VERSION):
                    raise QDoctorError(f"{path}: not qdoctor calibration statistics of version {STATS_VERSION}")
                layers, keys = json.loads(meta["layers"]), set(f.keys())
                stats, by_owner = {}, {}
                for name, owner in layers.items():
                    if owner not in by_owner:
                        st = LinearInputStats.from_tensors(f.get_tensor(f"{owner}.channel_absmax"),
                                                           f.get_tensor(f"{owner}.token_absmax"))
                        if f"{owner}.rows" in keys:
                            st.rows = f.get_tensor(f"{owner}.rows")
                        by_owner[owner] = st
                    stats[name] = by_owner[owner]
                config = CalibrationConfig(**json.loads(meta["config"]))
                input_ids = f.get_tensor("input_ids")
                basis = meta.get("basis", "")
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise QDoctorError(f"{path}: unreadable statistics file ({str(e).splitlines()[0]})") from None
        for st in by_owner.values():
            st.sample_rows, st.seed = config.sample_rows, config.seed
        return cls(layers=stats, input_ids=input_ids, config=config, basis=basis)


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
    body = window_body(config.seqlen, bos_id)
    if ids.numel() < body + 1:
        raise QDoctorError(f"calibration text has {ids.numel()} tokens; need more than {body} for seqlen {config.seqlen}")
    g = torch.Generator().manual_seed(config.seed)
    starts = torch.randint(0, ids.numel() - body, (config.n_samples,), generator=g)
    return prepend_bos(torch.stack([ids[s:s + body] for s in starts.tolist()]), bos_id)


def collect_linear_stats(model: nn.Module, input_ids: torch.Tensor, layer_names: list[str],
                         batch_size: int = 4, desc: str = "calibrating", sample_rows: int = 0,
                         seed: int = 0, block_transform=None, world: World | None = None) -> dict[str, LinearInputStats]:
    """Run ``input_ids`` (N, L) through the block pipeline (``models.streaming``) with pre-hooks
    that fold each named linear's input into a ``LinearInputStats`` (keeping ``sample_rows``
    sampled rows). Layers that read one tensor (q/k/v, gate/up) share one statistics object. ``block_transform(i, block)`` treats each block for this pass only (e.g.
    smooths it: the statistics of the smoothed model).

    Over several ranks (``world``, default ``current_world()``) each runs its shard of whole
    batches and the statistics are combined to those of every window (``reduce_over_ranks``)."""
    world = current_world() if world is None else world
    shard = world.shard(input_ids.shape[0], batch_size)
    row_offset = shard.start * input_ids.shape[1]  # global index of this rank's first token row
    modules = dict(model.named_modules())
    arch = arch_for(model)
    prefix = arch.blocks + "."
    shared = {rel: group[0] for group in arch.input_groups(model.config) for rel in group}
    stats: dict[str, LinearInputStats] = {}
    recorders: dict[str, LinearInputStats] = {}  # full name of the layer that records → its statistics
    by_block: dict[int, list[str]] = {}
    wanted = set(layer_names)
    for name in layer_names:
        mod = modules.get(name)
        if mod is None:
            raise QDoctorError(f"model has no module {name!r}")
        if not name.startswith(prefix):
            raise QDoctorError(f"{name} is not inside a decoder block; calibration records block inputs only")
        i, _, rel = name[len(prefix):].partition(".")
        # consumers of one norm see one tensor (``ArchSpec.input_groups``): one recorder for them all
        owner = f"{prefix}{i}.{shared.get(rel, rel)}"
        owner = owner if owner in wanted else name
        if owner not in recorders:
            recorders[owner] = LinearInputStats(in_features=mod.in_features, sample_rows=sample_rows, seed=seed,
                                                name=owner, row_offset=row_offset)
            by_block.setdefault(int(i), []).append(owner)
        stats[name] = recorders[owner]

    def on_block(i, block, inputs):
        if block_transform is not None:
            block_transform(i, block)
        handles = []
        for name in by_block.get(i, ()):
            def hook(_m, args, _s=stats[name]):
                _s.update(args[0])

            handles.append(block.get_submodule(name[len(prefix):].split(".", 1)[1]).register_forward_pre_hook(hook))
        try:
            return inputs.forward(block)
        finally:
            for h in handles:
                h.remove()

    stream_blocks(model, input_ids, on_block, batch_size=batch_size, desc=desc, progress=world.is_main,
                  transient=block_transform is not None, world=world)
    reduce_over_ranks(list(recorders.values()), world)
    return stats


def calibrate(model: nn.Module, tokenizer, config: CalibrationConfig | None = None,
              layer_names: list[str] | None = None, block_transform=None, basis: str = "") -> CalibrationStats:
    """Calibration statistics for every quantizable linear (registry) or ``layer_names``;
    ``block_transform`` as ``collect_linear_stats``'; ``basis`` names the transform the model is
    under (a rotation: ``CalibrationStats.basis``)."""
    config = config or CalibrationConfig()
    names = layer_names or block_linear_names(model)
    check_context(model, config.seqlen, "calibration seqlen")
    ids = calibration_windows(tokenizer, config, bos_id=bos_token_id(model, tokenizer))
    stats = collect_linear_stats(model, ids, names, config.batch_size, sample_rows=config.sample_rows,
                                 seed=config.seed, block_transform=block_transform)
    return CalibrationStats(layers=stats, input_ids=ids, config=config, basis=basis)
