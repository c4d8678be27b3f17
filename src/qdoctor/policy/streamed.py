"""The plan search for block-streamed (lazy) models: ``qdoctor fix --stream``.

Same staged search as ``policy.search`` (it calls ``search(..., searcher=StreamedSearcher)``),
with everything that needs weights done block by block, so a 70B-class model needs one block of
device memory at a time:

- calibration: one streamed pass (``calib.collect`` detects the lazy model);
- evidence (per-layer spike ratio, weight output errors, the coarsest sufficient group size):
  one pass over the blocks, weights only — no forward;
- a candidate plan: one streamed forward of the held-out windows in which block i, freshly read
  from its source, is smoothed (``transforms.smoothing.smooth_block``) and quantized
  (``quantize(block, ..., prefix=...)``) before it runs. Nothing needs undoing: the block is
  dropped after use and the next plan reads it again.

Per plan the cost is one read of every block plus one forward of the held-out windows, so the
search costs (number of trials + 3) passes over the checkpoint. Only the perplexity metric is
supported here (the zero-shot metric would need a streamed forward per batch of requests).
"""

from __future__ import annotations

import copy
import time

import torch

from qdoctor.calib.collect import CalibrationStats, calibrate
from qdoctor.errors import QDoctorError
from qdoctor.eval.perplexity import perplexity
from qdoctor.models.lazy import is_lazy
from qdoctor.models.registry import arch_for, block_linear_names, get_blocks
from qdoctor.models.streaming import materialized
from qdoctor.policy.evidence import LayerEvidence, choose_group_size, layer_evidence_of
from qdoctor.policy.metric import PerplexityMetric
from qdoctor.policy.recipe import _uses_percentile
from qdoctor.policy.search import FixConfig, Plan, Searcher, Trial, heldout_windows, resolve_target
from qdoctor.quant.apply import quantize
from qdoctor.transforms.smoothing import smooth_block


def each_block(model, fn, progress: bool = False, desc: str = "blocks") -> None:
    """``fn(i, block)`` for every decoder block, materializing lazy blocks one at a time
    (weights only, no forward)."""
    from tqdm.auto import tqdm

    for i in tqdm(range(len(get_blocks(model))), desc=desc, unit="block", disable=not progress, leave=False):
        with materialized(model, i) as block:
            fn(i, block)


def check_streamable(scheme, smoothing) -> None:
    """Refuse what one pass over the blocks cannot do: a percentile observer after smoothing
    needs the smoothed model's activations, i.e. a second calibration pass."""
    if smoothing and _uses_percentile(scheme):
        raise QDoctorError("smoothing with a percentile observer needs a recalibration pass; "
                           "not supported with --stream")


def treat_block(model, i: int, block, scheme, smoothing, stats: CalibrationStats | None) -> None:
    """What ``Recipe.apply`` does to a whole model, for decoder block ``i`` alone (materialized):
    each ``SmoothingStep`` (``smooth_block``), then ``quantize`` with the layers' full names.
    Smoothing rescales the statistics it reads, so it works on copies of this block's."""
    arch = arch_for(model)
    prefix = f"{arch.blocks}.{i}."
    if smoothing:
        names = [prefix + r for r in arch.linears]
        stats = CalibrationStats(layers={n: copy.deepcopy(stats.layers[n]) for n in names},
                                 input_ids=stats.input_ids, config=stats.config)
    for step in smoothing:
        smooth_block(model.config, arch, i, block, stats, step, scheme)
    quantize(block, scheme, calibration=stats, progress=False, prefix=prefix)


class StreamedSearcher(Searcher):
    """``Searcher`` for a lazy model (see the module docstring)."""

    def __init__(self, model, tokenizer, config: FixConfig, progress: bool = True):
        if not is_lazy(model):
            raise QDoctorError("StreamedSearcher needs a lazy model (qdoctor.load(..., stream=True))")
        if config.metric_spec.name != "ppl":
            raise QDoctorError("--stream searches with the perplexity metric only (--metric ppl)")
        self.model, self.tok, self.config, self.progress = model, tokenizer, config, progress
        self.target = resolve_target(config.target)
        self.metric_spec = config.metric_spec
        self.arch = arch_for(model)
        self.names = block_linear_names(model, self.arch)
        self.snapshot = None  # nothing to restore: every plan reads fresh blocks
        self.stats = calibrate(model, tokenizer, config.calibration, layer_names=self.names)
        self.windows = heldout_windows(tokenizer, config, self.arch)
        self.fp_ppl = perplexity(model, tokenizer, windows=self.windows, progress=progress, desc="fp held-out").ppl
        self._fp_cache: dict = {}
        self._group_sizes: dict[str, int] = {}
        self.evidence = self._evidence()
        c = config
        self.metric = PerplexityMetric(tokenizer, self.windows, fp_value=self.fp_ppl,
                                       source=f"last {c.calibration.holdout_fraction:.0%} of {c.calibration.source}")

    def _evidence(self) -> dict[str, LayerEvidence]:
        """``policy.evidence.layer_evidence`` block by block; the group size of every layer whose
        per-channel weight error exceeds the threshold is chosen in the same pass."""
        out: dict[str, LayerEvidence] = {}
        prefix = self.arch.blocks

        def fn(i, block):
            for rel in self.arch.linears:
                name = f"{prefix}.{i}.{rel}"
                w = block.get_submodule(rel).weight
                e = out[name] = layer_evidence_of(name, w, self.stats[name], self.config.group_size)
                if e.out_w_channel > self.config.weight_error_threshold:  # NaN (no rows) compares False
                    x = self.stats[name].rows.to(w.device)
                    self._group_sizes[name] = choose_group_size(x, w.detach(), self.config.weight_error_threshold)[0]

        each_block(self.model, fn, progress=self.progress, desc="evidence")
        return out

    def group_size(self, name: str) -> int:
        if name not in self._group_sizes:
            raise QDoctorError(f"{name}: no group size was chosen (its per-channel weight error is within "
                               "the threshold)")
        return self._group_sizes[name]

    def evaluate(self, plan: Plan, windows: torch.Tensor | None = None) -> Trial:
        """Held-out perplexity of ``plan``: one streamed pass, block i smoothed and quantized as read."""
        t0 = time.perf_counter()
        windows = self.windows if windows is None else windows
        recipe = self.recipe(plan)
        check_streamable(recipe.scheme, recipe.smoothing)

        def transform(i, block):
            treat_block(self.model, i, block, recipe.scheme, recipe.smoothing, self.stats)

        ppl = perplexity(self.model, self.tok, windows=windows, progress=False, desc=f"plan {plan.label}",
                         block_transform=transform).ppl
        ref = self.fp_ppl if windows is self.windows else self.fp_ppl_of(windows)
        return Trial(plan.label, ppl, 100.0 * (ppl / ref - 1.0), len(plan.kept()), len(plan.per_group()),
                     time.perf_counter() - t0, plan)

