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
from qdoctor.eval.perplexity import PerplexityResult, perplexity, token_windows
from qdoctor.models.loading import load
from qdoctor.quant.apply import quantize, restore
from qdoctor.quant.spec import Scheme, get_scheme

__all__ = ["load", "calibrate", "quantize", "restore", "perplexity", "compare_schemes", "SchemeResult",
           "CalibrationConfig", "CalibrationStats"]


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


def compare_schemes(model, tokenizer, schemes: list["str | Scheme"], seqlen: int = 2048, limit: int | None = None,
                    source: str = "wikitext2:test", calib_config: CalibrationConfig | None = None,
                    calibration: CalibrationStats | None = None, overrides: dict | None = None,
                    progress: bool = True) -> tuple[list[SchemeResult], CalibrationStats | None]:
    """Perplexity of the full-precision model, then of each scheme (quantize → measure → restore).

    The text is tokenized once; calibration runs once, only if a scheme needs static scales."""
    from qdoctor.calib.text import text_source
    from qdoctor.models.registry import arch_for

    resolved = [get_scheme(s) for s in schemes]
    if overrides:
        resolved = [s.with_overrides(_as_layer_schemes(overrides)) for s in resolved]
    arch = arch_for(model)
    bos = tokenizer.bos_token_id if arch.needs_bos else None
    windows = token_windows(tokenizer, text_source(source), seqlen, bos)
    t0 = time.perf_counter()
    fp = perplexity(model, tokenizer, windows=windows, limit=limit, progress=progress, desc="perplexity (full precision)")
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    results = [SchemeResult("full-precision", f"unquantized ({dtype})", fp, seconds=time.perf_counter() - t0)]
    if calibration is None and any(s.needs_calibration for s in resolved):
        calibration = calibrate(model, tokenizer, calib_config)
    for s in resolved:
        t0 = time.perf_counter()
        res = quantize(model, s, calibration=calibration, progress=progress)
        try:
            ppl = perplexity(model, tokenizer, windows=windows, limit=limit, progress=progress,
                             desc=f"perplexity ({s.name})")
        finally:
            restore(model)
        kept = sum(1 for ls in res.layers.values() if ls.keep)
        results.append(SchemeResult(s.name, s.description, ppl, quantized_layers=len(res.layers) - kept,
                                    kept_layers=kept, seconds=time.perf_counter() - t0))
    return results, calibration


def _as_layer_schemes(overrides: dict) -> dict:
    from qdoctor.quant.spec import LayerScheme

    return {k: v if isinstance(v, LayerScheme) else LayerScheme.from_dict(v) for k, v in overrides.items()}
