"""The public API in one place: load, calibrate, quantize, evaluate.

    model, tok = qdoctor.load("smollm2-135m")
    stats = qdoctor.calibrate(model, tok)                       # 64 × 512 tokens of WikiText-2 valid
    qdoctor.quantize(model, "w8a8-channel-tensor-static", calibration=stats)
    print(qdoctor.perplexity(model, tok, limit=4).ppl)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from qdoctor.calib.collect import CalibrationConfig, CalibrationStats, calibrate
from qdoctor.calib.text import text_source
from qdoctor.eval.perplexity import PerplexityResult, perplexity, token_windows
from qdoctor.models.loading import load
from qdoctor.models.registry import bos_token_id
from qdoctor.policy.recipe import Recipe
from qdoctor.quant.apply import quantize, restore
from qdoctor.quant.spec import LayerScheme, Scheme, get_scheme

__all__ = ["load", "calibrate", "quantize", "restore", "perplexity", "compare_schemes", "SchemeResult",
           "CalibrationConfig", "CalibrationStats", "Recipe"]


@dataclass
class SchemeResult:
    scheme: str
    description: str
    ppl: PerplexityResult
    quantized_layers: int = 0
    kept_layers: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_dict(self, fp_ppl: float | None = None) -> dict:
        d = {"scheme": self.scheme, "description": self.description, "ppl": self.ppl.ppl,
             "quantized_layers": self.quantized_layers, "kept_layers": self.kept_layers,
             "seconds": round(self.seconds, 2), "perplexity": self.ppl.to_dict()}
        if fp_ppl is not None:
            d["delta_pct"] = 100.0 * (self.ppl.ppl / fp_ppl - 1.0)
        d.update(self.extra)
        return d


def compare_schemes(model, tokenizer, schemes: list["str | Scheme | Recipe"], seqlen: int = 2048,
                    limit: int | None = None, source: str = "wikitext2:test",
                    calib_config: CalibrationConfig | None = None, calibration: CalibrationStats | None = None,
                    overrides: dict | None = None, progress: bool = True,
                    windows=None) -> tuple[list[SchemeResult], CalibrationStats | None]:
    """Perplexity of the full-precision model, then of each plan — a named scheme, a ``Scheme`` or
    a ``Recipe`` — each measured by ``Recipe.perplexity`` (every block treated as it is opened,
    for a model in memory and a block-streamed one alike; the model is unchanged afterwards).

    The text is tokenized once (or ``windows`` given); calibration runs once per distinct
    configuration, only for plans that need it: ``calibration`` (or ``calib_config``) for the
    schemes, a recipe's own configuration for a recipe. Returns the rows and the schemes'
    calibration statistics."""
    plans = [p if isinstance(p, Recipe) else get_scheme(p) for p in schemes]
    if overrides:
        plans = [p.with_overrides(_as_layer_schemes(overrides)) if isinstance(p, Scheme) else p for p in plans]
    calib_config = calib_config or CalibrationConfig()
    recipes = [Recipe.of(p, calib_config) for p in plans]
    if windows is None:
        windows = token_windows(tokenizer, text_source(source), seqlen, bos_token_id(model, tokenizer))
    fp = perplexity(model, tokenizer, windows=windows, limit=limit, progress=progress,
                    desc="perplexity (full precision)")
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    results = [SchemeResult("full-precision", f"unquantized ({dtype})", fp, seconds=fp.seconds)]
    stats_for: dict = {}  # (calibration config, basis) → statistics
    if calibration is not None:
        stats_for[calib_config, calibration.basis] = calibration
    for plan, r in zip(plans, recipes):
        t0 = time.perf_counter()
        cfg = r.calibration_config() if r.needs_calibration else None
        if cfg is not None and (cfg, r.basis) not in stats_for:
            stats_for[cfg, r.basis] = r.statistics(model, tokenizer)
        ppl, applied = r.perplexity(model, tokenizer, windows, stats_for.get((cfg, r.basis)), desc=f"perplexity ({r.name})",
                                    progress=progress, limit=limit)
        results.append(SchemeResult(r.name, plan.description if isinstance(plan, Scheme) else "recipe", ppl, quantized_layers=applied.quantized,
                                    kept_layers=applied.kept, seconds=time.perf_counter() - t0))
    return results, stats_for.get((calib_config, ""))


def _as_layer_schemes(overrides: dict) -> dict:
    return {k: v if isinstance(v, LayerScheme) else LayerScheme.from_dict(v) for k, v in overrides.items()}
