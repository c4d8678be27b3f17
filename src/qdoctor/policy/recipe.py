"""Recipes: a plan as a readable, re-applicable file (YAML or JSON).

    qdoctor_recipe: 1
    model: smollm2-135m                       # informational
    calibration: {n_samples: 64, seqlen: 512, source: wikitext2:valid, seed: 0, sample_rows: 512}
    smoothing:                                # applied in order to the full-precision model
      - {method: smoothquant, alpha: 0.8, layers: ["*"]}
    scheme:                                   # a qdoctor Scheme (docs/schemes.md)
      name: auto
      default: {weights: {dtype: int8, granularity: tensor}, activations: {dtype: int8, granularity: tensor}}
      overrides: {model.layers.11.mlp.down_proj: {keep: bf16}}
    evidence: {model.layers.11.mlp.down_proj: "spike ratio 2040"}   # why, informational
    metrics: {...}                            # what the search measured, informational

``Recipe.apply(model, tokenizer)`` calibrates (same seeded config → same statistics),
smooths, recalibrates if a percentile observer needs fresh per-token maxima, and quantizes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import yaml

from qdoctor.calib.collect import CalibrationConfig, CalibrationStats, calibrate
from qdoctor.errors import QDoctorError
from qdoctor.quant.apply import QuantizeResult, quantize
from qdoctor.quant.spec import Scheme
from qdoctor.transforms.smoothing import SmoothingStep, apply_smoothing

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

    @property
    def needs_calibration(self) -> bool:
        return bool(self.smoothing) or self.scheme.needs_calibration

    def needs_median_rows(self) -> bool:
        return any(s.method == "bismooth-median" for s in self.smoothing)

    def apply(self, model, tokenizer, stats: CalibrationStats | None = None, progress: bool = True) -> QuantizeResult:
        """Smooth and quantize ``model`` in place; returns the quantization result."""
        if self.needs_calibration and stats is None:
            stats = calibrate(model, tokenizer, self.calibration_config())
        for step in self.smoothing:
            apply_smoothing(model, stats, step, scheme=self.scheme)
        if self.smoothing and _uses_percentile(self.scheme):
            stats = calibrate(model, tokenizer, self.calibration)
        return quantize(model, self.scheme, calibration=stats, progress=progress)

    def calibration_config(self) -> CalibrationConfig:
        """The recipe's calibration, with 512 sampled rows per layer when the smoothing needs
        them (median factors, auto-α) and the recipe asked for none."""
        cfg = self.calibration
        if (self.needs_median_rows() or any(st.alpha == "auto" for st in self.smoothing)) and cfg.sample_rows == 0:
            cfg = CalibrationConfig(**{**cfg.__dict__, "sample_rows": 512})
        return cfg

    def to_dict(self) -> dict:
        return {
            "qdoctor_recipe": RECIPE_VERSION,
            "model": self.model,
            "calibration": {k: getattr(self.calibration, k) for k in sorted(_CALIB_KEYS)},
            "smoothing": [s.to_dict() for s in self.smoothing],
            "scheme": self.scheme.to_dict(),
            "evidence": self.evidence,
            "metrics": self.metrics,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        if not isinstance(d, dict) or "scheme" not in d:
            raise QDoctorError("a recipe is a mapping with at least a 'scheme'")
        from qdoctor.quant.schemefile import check_recipe_dict

        check_recipe_dict(d)  # types (issue 18: never a TypeError from a malformed file)
        version = d.get("qdoctor_recipe", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise QDoctorError(f"recipe version {version} is not supported (this qdoctor reads {RECIPE_VERSION})")
        unknown = set(d) - {"qdoctor_recipe", "model", "calibration", "smoothing", "scheme", "evidence", "metrics"}
        if unknown:
            raise QDoctorError(f"unknown key(s) in recipe: {', '.join(sorted(unknown))}")
        cal = d.get("calibration") or {}
        bad = set(cal) - _CALIB_KEYS
        if bad:
            raise QDoctorError(f"unknown calibration key(s) in recipe: {', '.join(sorted(bad))}")
        return cls(scheme=Scheme.from_dict(d["scheme"]),
                   smoothing=[SmoothingStep.from_dict(s) for s in d.get("smoothing") or []],
                   calibration=CalibrationConfig(**cal), model=str(d.get("model", "")),
                   evidence=dict(d.get("evidence") or {}), metrics=dict(d.get("metrics") or {}))

    def dumps(self, fmt: str = "yaml") -> str:
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=2) + "\n"
        return yaml.safe_dump(self.to_dict(), sort_keys=False, width=100)


def _uses_percentile(scheme: Scheme) -> bool:
    specs = [scheme.default] + list(scheme.overrides.values())
    return any(ls.activations is not None and not ls.activations.dynamic and ls.activations.observer != "absmax"
               for ls in specs)


def load_recipe(path: str) -> Recipe:
    from qdoctor.quant.schemefile import read_plan_data

    return Recipe.from_dict(read_plan_data(path, "recipe", yaml_always=True))  # YAML is a superset of JSON


def save_recipe(recipe: Recipe, path: str) -> None:
    from qdoctor.io import atomic_write_text

    atomic_write_text(path, recipe.dumps("json" if path.endswith(".json") else "yaml"))
