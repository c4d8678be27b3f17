"""Recipes: a plan as a readable, re-applicable file (YAML or JSON).

    qdoctor_recipe: 1
    model: smollm2-135m                       # informational
    calibration: {n_samples: 64, seqlen: 512, source: wikitext2:valid, seed: 0, sample_rows: 512}
    rotation: {r1: true, r2: true, r4: false}  # Hadamard rotations (transforms/rotation.py), optional
    smoothing:                                # applied in order to the full-precision model
      - {method: smoothquant, alpha: 0.8, layers: ["*"]}
    gptq: {dampening: 0.01, act_order: false, block_size: 128, propagate: false}   # optional
    scheme:                                   # a qdoctor Scheme (docs/schemes.md)
      name: auto
      default: {weights: {dtype: int8, granularity: tensor}, activations: {dtype: int8, granularity: tensor}}
      overrides: {model.layers.11.mlp.down_proj: {keep: bf16}}
    evidence: {model.layers.11.mlp.down_proj: "spike ratio 2040"}   # why, informational
    metrics: {...}                            # what the search measured, informational

A plan is applied per decoder block: ``Recipe.apply_block(model, i, block, stats)`` rotates
block i (``rotation``), folds the smoothing steps into it and quantizes its layers; a rotation's
part outside the blocks (embeddings, final norm, LM head) is done once around the block pass
(``Recipe.rotated``); everything else is a walk over the
blocks by the pipeline (``models.streaming``):

- ``Recipe.perplexity(model, tok, windows)`` — the one way a plan is measured: each block is
  treated as it is opened and put back when it is closed (``stream_blocks(transient=True)``),
  so a model in memory and a block-streamed one take the same path and nothing needs undoing;
- ``Recipe.applied(model, tok)`` — the model treated in place while a ``with`` lasts, for what
  needs the whole treated model (zero-shot scoring), restored after;
- ``Recipe.apply(model, tokenizer)`` — the model treated in place for good.

GPTQ (``gptq:``, ``quant.gptq``): one more pass over the calibration windows before the plan is
applied (``gptq_weights``, ``quant.gptq_pass``) rounds each block's weights after its smoothing;
``apply_block`` then quantizes the block with exactly those weights and scales.

Named recipes (``NAMED_RECIPES``, name → function(target scheme) → Recipe): ``smoothquant-gptq``
is llm-compressor's standard W8A8 recipe, SmoothQuant α = 0.8 on every pair + GPTQ.

Calibration: the recipe's seeded config gives the same statistics every time; a percentile
observer after smoothing needs the per-token maxima of the smoothed model, so those come from
one more calibration pass with the smoothing alone applied (``quantization_stats``). The ``mse``
observer reads the sampled rows, which smoothing rescales exactly: no extra pass.
Statistics recorded in another basis than the plan's rotation (``CalibrationStats.basis``: an
unrotated scan's, handed to every candidate by the plan search) describe another model: they
are recalibrated with the rotation applied (``statistics``).
"""

from __future__ import annotations

import copy
import json
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn
import yaml

from qdoctor.calib.collect import CalibrationConfig, CalibrationStats, calibrate, calibration_windows
from qdoctor.calib.observers import NEEDS_ROWS, NEEDS_TOKEN_MAXIMA
from qdoctor.errors import QDoctorError
from qdoctor.eval.perplexity import PerplexityResult, perplexity
from qdoctor.io import atomic_write_text
from qdoctor.models.registry import arch_for, bos_token_id
from qdoctor.models.streaming import each_block, require_resident
from qdoctor.policy.lc_recipe import from_llm_compressor, is_lc_recipe
from qdoctor.quant.apply import QuantizeResult, quantize, restore
from qdoctor.quant.gptq import GPTQConfig
from qdoctor.quant.gptq_pass import GPTQWeights, gptq_pass
from qdoctor.quant.linear import clear_input_transforms
from qdoctor.quant.schemefile import check_recipe_dict, read_plan_data
from qdoctor.quant.spec import Scheme, get_scheme
from qdoctor.transforms.rotation import RestSnapshot, RotationStep, rotate_block, rotate_rest, rotated_rest
from qdoctor.transforms.smoothing import SmoothingStep, smooth_block

RECIPE_VERSION = 1
_CALIB_KEYS = {"n_samples", "seqlen", "source", "seed", "batch_size", "sample_rows", "holdout_fraction"}


@dataclass
class Recipe:
    scheme: Scheme
    smoothing: list[SmoothingStep] = field(default_factory=list)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    model: str = ""
    evidence: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    rotation: RotationStep | None = None  # Hadamard rotations, applied before smoothing
    gptq: GPTQConfig | None = None  # round the weights with GPTQ (None: round to nearest)

    @property
    def basis(self) -> str:
        """The basis the plan's calibration statistics must be in (``RotationStep.basis``)."""
        return self.rotation.basis if self.rotation is not None else ""

    @contextmanager
    def rotated(self, model):
        """The model's non-block part rotated (R1: embeddings, final norm, LM head) while the
        ``with`` lasts; nothing without a rotation. The blocks are rotated by ``apply_block``."""
        with rotated_rest(model, self.rotation) as notes:
            yield notes

    def rotate_block(self, model, i: int, block) -> None:
        """The rotation's part of decoder block ``i`` (nothing without a rotation)."""
        if self.rotation is not None and self.rotation.active:
            rotate_block(model.config, arch_for(model), block, self.rotation)

    def _calibrate(self, model, tokenizer, config: CalibrationConfig, block_transform=None) -> CalibrationStats:
        """A calibration pass of the model as the plan sees it: rotated (when it is), each block
        also treated by ``block_transform``."""
        def treat(i, block):
            self.rotate_block(model, i, block)
            if block_transform is not None:
                block_transform(i, block)

        rotating = self.rotation is not None and self.rotation.active
        with self.rotated(model):
            return calibrate(model, tokenizer, config, basis=self.basis,
                             block_transform=treat if rotating or block_transform is not None else None)

    @property
    def needs_calibration(self) -> bool:
        return bool(self.smoothing) or self.scheme.needs_calibration

    def needs_median_rows(self) -> bool:
        return any(s.method == "bismooth-median" for s in self.smoothing)

    @classmethod
    def of(cls, plan: "Recipe | Scheme", calibration: CalibrationConfig | None = None) -> "Recipe":
        """``plan`` as a recipe: a recipe as it is, a scheme as a recipe without smoothing that
        calibrates with ``calibration`` (default ``CalibrationConfig()``)."""
        if isinstance(plan, Recipe):
            return plan
        return cls(scheme=plan, calibration=calibration or CalibrationConfig())

    @property
    def name(self) -> str:
        return self.scheme.name

    def statistics(self, model, tokenizer, stats: CalibrationStats | None = None) -> CalibrationStats | None:
        """``stats``, or a calibration pass with the recipe's config when the plan needs one — or
        when ``stats`` were recorded in another basis (``CalibrationStats.basis``: e.g. unrotated
        statistics for a rotated plan), with the rotation applied."""
        if stats is not None and stats.basis != self.basis:
            stats = None
        if stats is None and self.needs_calibration:
            stats = self._calibrate(model, tokenizer, self.calibration_config())
        return stats

    def quantization_stats(self, model, tokenizer, stats: CalibrationStats | None) -> CalibrationStats | None:
        """The statistics the static scales come from: ``stats`` (smoothing rescales their channel
        maxima exactly), or — for a percentile observer after smoothing, which needs per-token
        maxima of the smoothed activations — a calibration pass with only the smoothing applied."""
        if not (self.smoothing and _uses_percentile(self.scheme)):
            return None
        return self._calibrate(model, tokenizer, self.calibration_config(),
                               block_transform=lambda i, block: self.smooth_block(model, i, block, stats))

    def smooth_block(self, model, i: int, block, stats: CalibrationStats | None) -> CalibrationStats | None:
        """Fold every smoothing step into decoder block ``i``; returns the statistics of the block's
        layers after it (copies, rescaled as the smoothing divides the channels) or ``stats``."""
        if not self.smoothing:
            return stats
        arch = arch_for(model)
        prefix = f"{arch.blocks}.{i}."
        names = [prefix + r for r in arch.linears]
        # one deepcopy of the block's statistics: layers that shared an object still do
        stats = CalibrationStats(layers=copy.deepcopy({n: stats[n] for n in names}), input_ids=stats.input_ids,
                                 config=stats.config, basis=stats.basis)
        for step in self.smoothing:
            smooth_block(model.config, arch, i, block, stats, step, self.scheme)
        return stats

    def apply_block(self, model, i: int, block, stats: CalibrationStats | None,
                    quant_stats: CalibrationStats | None = None, gptq: GPTQWeights | None = None) -> QuantizeResult:
        """Treat decoder block ``i`` (opened by the pipeline): the rotation, the smoothing steps, then
        the scheme on the block's layers by their full names. Static scales come from ``quant_stats``
        when given (``quantization_stats``), else from the smoothed copy of ``stats``; the weights from
        ``gptq`` (``gptq_weights``) when given, else rounded to nearest. With a rotation the caller
        holds ``rotated(model)`` around the block pass."""
        return self.prepare_block(model, i, block, stats, quant_stats)(gptq.block(i) if gptq is not None else None)

    def prepare_block(self, model, i: int, block, stats: CalibrationStats | None,
                      quant_stats: CalibrationStats | None = None):
        """Treat block ``i`` up to weight rounding (the rotation, the smoothing steps); returns
        ``finish(weights)`` that quantizes it, with {name: (Ŵ, scale)} for the layers GPTQ rounded
        (None: none)."""
        self.rotate_block(model, i, block)
        smoothed = self.smooth_block(model, i, block, stats)
        prefix = f"{arch_for(model).blocks}.{i}."
        return lambda weights: quantize(block, self.scheme, calibration=quant_stats or smoothed, progress=False,
                                        prefix=prefix, weights=weights)

    def gptq_weights(self, model, tokenizer, stats: CalibrationStats | None,
                     quant_stats: CalibrationStats | None = None, progress: bool = False) -> GPTQWeights | None:
        """The GPTQ pass (``quant.gptq_pass``) over the calibration windows (those of ``stats``, or
        the recipe's), every block prepared as ``apply_block`` prepares it; None without ``gptq``."""
        if self.gptq is None:
            return None
        if stats is None and tokenizer is None:
            raise QDoctorError("GPTQ needs calibration windows: pass the tokenizer or the calibration statistics")
        ids = stats.input_ids if stats is not None else calibration_windows(
            tokenizer, self.calibration, bos_id=bos_token_id(model, tokenizer))
        with self.rotated(model):  # the pass sees the model as the plan treats it
            return gptq_pass(model, ids, self.scheme, self.gptq,
                             lambda i, block: self.prepare_block(model, i, block, stats, quant_stats),
                             batch_size=self.calibration.batch_size, progress=progress)

    def apply_rest(self, model, stats: CalibrationStats | None) -> QuantizeResult | None:
        """Quantize the layers outside the decoder blocks that the scheme selects (an LM head it
        does not ignore); None when there are none."""
        blocks = arch_for(model).blocks
        outside = self.scheme.with_ignore((f"{blocks}.*",))
        if not any(outside.resolve(n) is not None for n, m in model.named_modules() if isinstance(m, nn.Linear)):
            return None
        return quantize(model, outside, calibration=stats, progress=False)

    def perplexity(self, model, tokenizer, windows, stats: CalibrationStats | None = None, desc: str = "perplexity",
                   progress: bool = False, limit: int | None = None,
                   gptq: GPTQWeights | None = None) -> tuple[PerplexityResult, QuantizeResult]:
        """(perplexity of ``windows`` under the plan, what was applied): every block treated as
        it is opened and put back when it is closed; the model is unchanged afterwards.
        ``gptq``: the plan's GPTQ weights when already computed (``gptq_weights``)."""
        stats = self.statistics(model, tokenizer, stats)
        qstats = self.quantization_stats(model, tokenizer, stats)
        if gptq is None:
            gptq = self.gptq_weights(model, tokenizer, stats, qstats, progress=progress)
        applied = QuantizeResult(scheme=self.scheme, layers={}, ignored=[])
        with ExitStack() as rest:
            rest.enter_context(self.rotated(model))
            head = self.apply_rest(model, stats)
            if head is not None:
                rest.callback(restore, model)
                applied.merge(head)

            def treat(i, block):
                applied.merge(self.apply_block(model, i, block, stats, qstats, gptq))

            ppl = perplexity(model, tokenizer, windows=windows, limit=limit, desc=desc, progress=progress,
                             block_transform=treat)
        return ppl, applied

    @contextmanager
    def applied(self, model, tokenizer, stats: CalibrationStats | None = None):
        """The model (in memory) treated in place while the ``with`` lasts, as it was after."""
        require_resident(model, "applying a plan to the whole model")
        changes_weights = bool(self.smoothing) or self.basis != ""
        snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()} if changes_weights else None
        rest = RestSnapshot.of(model) if self.basis else None
        try:
            yield self.apply(model, tokenizer, stats, progress=False)
        finally:
            restore(model)
            clear_input_transforms(model)
            if rest is not None:
                rest.put_back(model)  # re-ties a head the rotation untied
            if snapshot is not None:
                model.load_state_dict(snapshot)

    def apply(self, model, tokenizer, stats: CalibrationStats | None = None, progress: bool = True) -> QuantizeResult:
        """Smooth and quantize ``model`` (in memory) in place, block by block; returns what was applied."""
        require_resident(model, "treating the whole model in place")
        stats = self.statistics(model, tokenizer, stats)
        qstats = self.quantization_stats(model, tokenizer, stats)
        gptq = self.gptq_weights(model, tokenizer, stats, qstats, progress=progress)
        applied = QuantizeResult(scheme=self.scheme, layers={}, ignored=[])
        if self.rotation is not None:
            rotate_rest(model, self.rotation)
        head = self.apply_rest(model, stats)
        if head is not None:
            applied.merge(head)
        each_block(model, lambda i, block: applied.merge(self.apply_block(model, i, block, stats, qstats, gptq)),
                   progress=progress, desc=f"applying {self.scheme.name}")
        return applied

    def calibration_config(self) -> CalibrationConfig:
        """The recipe's calibration, with 512 sampled rows per layer when the smoothing (median
        factors, auto-α) or an observer (``mse``) needs them and the recipe asked for none."""
        cfg = self.calibration
        needs_rows = (self.needs_median_rows() or any(st.alpha == "auto" for st in self.smoothing)
                      or bool(_static_observers(self.scheme) & NEEDS_ROWS))  # the mse observer
        if needs_rows and cfg.sample_rows == 0:
            cfg = CalibrationConfig(**{**cfg.__dict__, "sample_rows": 512})
        return cfg

    def to_dict(self) -> dict:
        d = {
            "qdoctor_recipe": RECIPE_VERSION,
            "model": self.model,
            "calibration": {k: getattr(self.calibration, k) for k in sorted(_CALIB_KEYS)},
            **({"rotation": self.rotation.to_dict()} if self.rotation is not None else {}),
            "smoothing": [s.to_dict() for s in self.smoothing],
            "scheme": self.scheme.to_dict(),
            "evidence": self.evidence,
            "metrics": self.metrics,
        }
        if self.gptq is not None:
            d["gptq"] = self.gptq.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        if not isinstance(d, dict) or "scheme" not in d:
            raise QDoctorError("a recipe is a mapping with at least a 'scheme'")
        check_recipe_dict(d)  # types (issue 18: never a TypeError from a malformed file)
        version = d.get("qdoctor_recipe", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise QDoctorError(f"recipe version {version} is not supported (this qdoctor reads {RECIPE_VERSION})")
        unknown = set(d) - {"qdoctor_recipe", "model", "calibration", "smoothing", "scheme", "evidence", "metrics",
                            "rotation", "gptq"}
        if unknown:
            raise QDoctorError(f"unknown key(s) in recipe: {', '.join(sorted(unknown))}")
        cal = d.get("calibration") or {}
        bad = set(cal) - _CALIB_KEYS
        if bad:
            raise QDoctorError(f"unknown calibration key(s) in recipe: {', '.join(sorted(bad))}")
        return cls(scheme=Scheme.from_dict(d["scheme"]),
                   smoothing=[SmoothingStep.from_dict(s) for s in d.get("smoothing") or []],
                   calibration=CalibrationConfig(**cal), model=str(d.get("model", "")),
                   evidence=dict(d.get("evidence") or {}), metrics=dict(d.get("metrics") or {}),
                   rotation=RotationStep.from_dict(d["rotation"]) if d.get("rotation") is not None else None,
                   gptq=GPTQConfig.from_dict(d["gptq"]) if d.get("gptq") is not None else None)

    def dumps(self, fmt: str = "yaml") -> str:
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=2) + "\n"
        return yaml.safe_dump(self.to_dict(), sort_keys=False, width=100)


def _static_observers(scheme: Scheme) -> set[str]:
    """The observer kinds (``percentile`` for ``percentile:99.9``) of the scheme's static activations."""
    specs = [scheme.default] + list(scheme.overrides.values())
    return {ls.activations.observer.partition(":")[0] for ls in specs
            if ls.activations is not None and not ls.activations.dynamic}


def _uses_percentile(scheme: Scheme) -> bool:
    """An observer that reads per-token maxima (stale after smoothing: ``quantization_stats``)."""
    return bool(_static_observers(scheme) & NEEDS_TOKEN_MAXIMA)


def read_recipe(path: str) -> tuple[Recipe, list[str]]:
    """(the recipe in ``path``, notes for the user): a qdoctor recipe as it is, an llm-compressor
    recipe mapped onto one (``policy.lc_recipe``; the notes say what could not be expressed), or —
    when no such file exists — the named recipe ``NAME[:SCHEME]`` (``NAMED_RECIPES``)."""
    name, _, scheme = str(path).partition(":")
    if name in NAMED_RECIPES and not Path(path).exists():  # a named recipe NAME[:SCHEME]
        return named_recipe(name, scheme or None), []
    data = read_plan_data(path, "recipe", yaml_always=True)  # YAML is a superset of JSON
    if not is_lc_recipe(data):
        return Recipe.from_dict(data), []
    try:
        imported = from_llm_compressor(data)
    except QDoctorError as e:
        raise QDoctorError(f"{path}: llm-compressor recipe: {e}") from None
    except (TypeError, ValueError, AttributeError, KeyError) as e:  # a field of the wrong shape
        raise QDoctorError(f"{path}: llm-compressor recipe: malformed field ({type(e).__name__}: {e})") from None
    return Recipe.from_dict(imported.recipe), imported.notes


def load_recipe(path: str) -> Recipe:
    """The recipe ``read_recipe`` reads (a file, or a named recipe such as
    ``smoothquant-gptq:w8a8-channel-tensor-static``), without its notes."""
    return read_recipe(path)[0]


def save_recipe(recipe: Recipe, path: str) -> None:
    atomic_write_text(path, recipe.dumps("json" if path.endswith(".json") else "yaml"))


def smoothquant_gptq(scheme: "Scheme | str" = "w8a8-channel-token") -> Recipe:
    """llm-compressor's standard W8A8 recipe (its Llama-3 examples): SmoothQuant α = 0.8 on every
    norm→linear and linear→linear pair, then GPTQ with its defaults, on ``scheme``."""
    scheme = get_scheme(scheme)
    return Recipe(scheme=scheme, smoothing=[SmoothingStep(method="smoothquant", alpha=0.8)], gptq=GPTQConfig(),
                  evidence={"recipe": "smoothquant-gptq: llm-compressor's SmoothQuant 0.8 + GPTQ W8A8 recipe"})


NAMED_RECIPES = {"smoothquant-gptq": smoothquant_gptq}  # name → function(target scheme) → Recipe


def named_recipe(name: str, scheme: "Scheme | str | None" = None) -> Recipe:
    """The named recipe ``name`` (``NAMED_RECIPES``) on ``scheme`` (default: its own)."""
    try:
        make = NAMED_RECIPES[name]
    except KeyError:
        raise QDoctorError(f"unknown named recipe {name!r}; named recipes: {', '.join(NAMED_RECIPES)}") from None
    return make() if scheme is None else make(scheme)
