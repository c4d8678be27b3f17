"""Stage 2 (per-group weights) and stage 4 (kept layers) share one layer budget: a per-group plan
that spends all of it for a small gain must not starve the kept layers that gain more."""

from helpers import tiny_model, tiny_tokenizer
from qdoctor.calib.collect import CalibrationConfig
from qdoctor.models.registry import block_linear_names
from qdoctor.policy.search import FixConfig, Searcher, search
from qdoctor.transforms.plant import plant_weight_outliers

CAL = CalibrationConfig(n_samples=4, seqlen=64, sample_rows=32, holdout_fraction=0.2)


class Weighted(Searcher):
    """Real scan and evidence, a made-up monotone score: a per-group layer helps a little, a kept
    layer a lot (what happens on SmolLM2 after a rotation under per-tensor static activations)."""

    def evaluate(self, plan, windows=None):
        ppl = self.fp_ppl * (1.20 - 0.002 * len(plan.per_group()) - 0.03 * len(plan.kept()) - 0.001 * len(plan.smoothing))
        return self.make_trial(plan, ppl, 0.0)


def test_kept_layers_are_not_starved_by_per_group_layers():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    plant_weight_outliers(model, blocks=(0,), projections=("q", "k", "v"), dims=2, magnitude=60.0)
    n = len(block_linear_names(model))
    cfg = FixConfig(target="w8a8-token", budget_pct=0.0, eval_windows=1, eval_seqlen=64, spike_min_ratio=1.0,
                    alphas=(0.5,), calibration=CAL, serve="any", max_layer_fraction=3.5 / n)
    r = search(model, tok, cfg, searcher=Weighted(model, tok, cfg, progress=False), progress=False)
    labels = [t.label for t in r.trials]
    stage2 = next(t for t in r.trials if t.label.startswith("mixed-granularity"))
    assert stage2.per_group == 3  # stage 2 ran and spent the whole budget of 3 layers
    assert "mixed-granularity+smoothquant-0.5" in labels  # stage 3 built on stage 2's plan ...
    assert "smoothquant-0.5" in labels  # ... and the same plan without stage 2's layers was tried
    assert r.best.per_group == 0 and r.best.kept == 3, r.best.label
    assert r.best.label.startswith("smoothquant-0.5+keep3")
    assert "mixed-granularity" not in r.best.label
    assert r.best.ppl < min(t.ppl for t in r.trials if t.per_group)
