"""The search's further candidate steps (``FixConfig.methods``): rotation, scale search, GPTQ and
llm-compressor's standard recipe are tried, the best trial's plan is what the recipe records, and
re-applying that recipe gives the trial's perplexity."""

import pytest

from helpers import tiny_model, tiny_tokenizer
from qdoctor.calib.collect import CalibrationConfig
from qdoctor.errors import QDoctorError
from qdoctor.policy import metric as metric_mod
from qdoctor.policy.recipe import Recipe
from qdoctor.policy.search import METHODS, FixConfig, Searcher, rotation_candidates, search
from qdoctor.models.registry import arch_for
from qdoctor.serve.profiles import check_plan


def _cfg(**kw):
    return FixConfig(target="w8a8-tensor-tensor-static", budget_pct=0.0, eval_windows=1, eval_seqlen=64,
                     calibration=CalibrationConfig(n_samples=4, seqlen=64, sample_rows=64, holdout_fraction=0.2),
                     **kw)


def test_every_method_is_tried_and_the_recipe_reproduces_the_best(monkeypatch):
    monkeypatch.setattr(metric_mod.PerplexityMetric, "within_budget", lambda self, *a, **k: False)
    model, tok = tiny_model("llama"), tiny_tokenizer()
    cfg = _cfg(methods=METHODS, serve="vllm")
    s = Searcher(model, tok, cfg, progress=False)
    res = search(model, tok, cfg, searcher=s, progress=False)
    labels = [t.label for t in res.trials]
    assert any(lb.startswith("rotation-r1+r2") for lb in labels)
    assert any("+mse-activations" in lb for lb in labels) and any("+mse-weights" in lb for lb in labels)
    assert any(lb.endswith("+gptq") for lb in labels) and "smoothquant-0.8+gptq" in labels
    assert res.best.value == min(t.value for t in res.trials)
    assert check_plan(res.recipe, s.names, cfg.profile) == []
    again = Recipe.from_dict(res.recipe.to_dict())  # what the recipe file holds, measured afresh
    ppl = again.perplexity(model, tok, s.windows)[0].ppl
    assert ppl == pytest.approx(res.best.ppl, rel=1e-6)


@pytest.mark.parametrize("polish", [True, False])
def test_free_steps_polish_a_plan_that_already_meets_the_budget(monkeypatch, polish):
    """Every plan meets the budget: with polish the free steps (mse, GPTQ) still run on it and the
    better trial wins; without, the search stops at the naive plan."""
    monkeypatch.setattr(metric_mod.PerplexityMetric, "within_budget", lambda self, *a, **k: True)
    model, tok = tiny_model("llama"), tiny_tokenizer()
    cfg = _cfg(methods=("rotation", "mse", "gptq"), serve="any", polish=polish)
    res = search(model, tok, cfg, searcher=Searcher(model, tok, cfg, progress=False), progress=False)
    labels = [t.label for t in res.trials]
    if not polish:
        assert labels == ["naive"]
        return
    assert labels[0] == "naive" and not any(lb.startswith("rotation") for lb in labels)  # rotation is not free
    assert "naive+mse-activations" in labels and any(lb.endswith("+gptq") for lb in labels)
    assert res.best.value == min(t.value for t in res.trials)


def test_rotation_candidates_follow_the_family_refusals():
    assert [c.r4 for c in rotation_candidates(arch_for(tiny_model("llama")))] == [False, True]
    assert rotation_candidates(arch_for(tiny_model("gemma3_text"))) == []  # R1 refused for Gemma 3


def test_unknown_method_is_refused():
    with pytest.raises(QDoctorError, match="unknown search method"):
        _cfg(methods=("awq",))
