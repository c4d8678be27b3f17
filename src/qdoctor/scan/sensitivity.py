"""Optional per-layer sensitivity: the perplexity change when only one layer (``"layer"``) or only
one projection type in every block (``"projection"``) is quantized with ``sensitivity_scheme``,
everything else left in full precision, on the first ``sensitivity_windows`` windows of
``sensitivity_source`` (WikiText-2 *valid* by default, so choosing layers by it never touches
the test split).

Each run is ``Recipe.perplexity`` (the block pipeline: the chosen layers quantized as their
block is opened, put back when it is closed), so a block-streamed model is measured the same
way. Cost: one perplexity run per layer (210 on SmolLM2) or per projection type (7): off by
default.
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm

import torch.nn as nn

from qdoctor.calib.text import text_source
from qdoctor.eval.perplexity import perplexity, token_windows
from qdoctor.models.registry import bos_token_id
from qdoctor.policy.recipe import Recipe
from qdoctor.quant.spec import Scheme, get_scheme


def _only(scheme: Scheme, targets: list[str], all_layers: list[str]) -> Scheme:
    """``scheme`` applied to ``targets`` only: every other layer (and the lm_head) is ignored."""
    chosen = set(targets)
    ignore = tuple(n for n in all_layers if n not in chosen) + tuple(scheme.ignore)
    return Scheme(name=f"{scheme.name}[only]", default=scheme.default, overrides=dict(scheme.overrides),
                  ignore=ignore, description=scheme.description)


def measure_sensitivity(model, tokenizer, findings, calibration, config) -> dict:
    """Fill ``finding.sensitivity`` (layer mode) and return the report's ``sensitivity`` section."""
    t0 = time.perf_counter()
    windows = token_windows(tokenizer, text_source(config.sensitivity_source), config.sensitivity_seqlen,
                            bos_token_id(model, tokenizer))
    windows = windows[: config.sensitivity_windows]
    scheme = get_scheme(config.sensitivity_scheme)
    all_linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    base = perplexity(model, tokenizer, windows=windows, progress=False).ppl
    if config.sensitivity == "layer":
        targets = {f.name: [f.name] for f in findings}
    else:
        targets = {}
        for f in findings:
            targets.setdefault(f.projection, []).append(f.name)
    results = {}
    for key, names in tqdm(targets.items(), desc="sensitivity", unit=config.sensitivity, leave=False,
                           disable=not config.progress):
        only = Recipe(scheme=_only(scheme, names, all_linear), calibration=calibration.config)
        ppl = only.perplexity(model, tokenizer, windows, calibration)[0].ppl
        results[key] = {"ppl": round(ppl, 4), "delta_pct": round(100.0 * (ppl / base - 1.0), 3), "layers": len(names)}
    by_name = {f.name: f for f in findings}
    for key, r in results.items():
        if config.sensitivity == "layer":
            by_name[key].sensitivity = {"ppl": r["ppl"], "delta_pct": r["delta_pct"]}
        else:
            for n in targets[key]:
                by_name[n].sensitivity = {"projection_ppl": r["ppl"], "projection_delta_pct": r["delta_pct"]}
    return {"mode": config.sensitivity, "scheme": scheme.name, "source": config.sensitivity_source,
            "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "baseline_ppl": round(base, 4),
            "results": results, "seconds": round(time.perf_counter() - t0, 1)}
