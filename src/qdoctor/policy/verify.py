"""Verification of a searched plan on text the search never saw: perplexity of full precision,
the naive target scheme and the plan on the first ``limit`` windows of the test split.

Each plan is scored by the ``Searcher`` that found it (its calibration statistics; one pass of
the windows through the block pipeline per plan), so the numbers are those of the plan as the
recipe re-applies it."""

from __future__ import annotations

from qdoctor.calib.text import text_source
from qdoctor.eval.perplexity import token_windows
from qdoctor.models.registry import bos_token_id
from qdoctor.policy.search import Plan


def verify_perplexities(searcher, plan: Plan, seqlen: int = 2048, limit: int | None = None,
                      text: str = "wikitext2:test") -> dict:
    """``{split, windows, seqlen, fp_ppl, naive_ppl, planned_ppl, naive_delta_pct, planned_delta_pct}``;
    Δ% = 100·(PPL / FP PPL − 1)."""
    model, tok = searcher.model, searcher.tok
    windows = token_windows(tok, text_source(text), seqlen, bos_token_id(model, tok))[:limit]
    out = {"split": text, "windows": int(windows.shape[0]), "seqlen": seqlen}
    out["fp_ppl"] = searcher.fp_ppl_of(windows)
    out["naive_ppl"] = searcher.evaluate(Plan(), windows=windows).ppl
    out["planned_ppl"] = searcher.evaluate(plan, windows=windows).ppl
    out["naive_delta_pct"] = 100 * (out["naive_ppl"] / out["fp_ppl"] - 1)
    out["planned_delta_pct"] = 100 * (out["planned_ppl"] / out["fp_ppl"] - 1)
    return out
