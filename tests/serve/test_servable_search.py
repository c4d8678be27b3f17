"""The fix search under a serving profile never emits (nor tries) a plan the profile refuses."""

import pytest

from helpers import tiny_model, tiny_tokenizer
from qdoctor.calib.collect import CalibrationConfig
from qdoctor.errors import QDoctorError
from qdoctor.policy.search import FixConfig, Plan, Searcher, search
from qdoctor.scan.run import scan_with_stats
from qdoctor.serve.profiles import check_plan
from qdoctor.transforms.plant import plant_weight_outliers

CAL = CalibrationConfig(n_samples=4, seqlen=64, sample_rows=32, holdout_fraction=0.2)


def planted_tiny():
    model = tiny_model("llama")
    plant_weight_outliers(model, blocks=(0,), projections=("q", "k", "v"), dims=2, magnitude=60.0)
    return model, tiny_tokenizer()


def _cfg(**kw):
    return FixConfig(target="w8a8-token", budget_pct=0.0, eval_windows=1, eval_seqlen=64, max_layer_fraction=0.5,
                     spike_min_ratio=1.0, alphas=(0.5,), calibration=CAL, **kw)


class Scored(Searcher):
    """A real scan and real profile checks, with a made-up but monotone score so that every stage
    runs: the naive plan misses the budget, each override or smoothing step helps a little."""

    def evaluate(self, plan, windows=None):
        ppl = self.fp_ppl * (1.10 - 0.01 * len(plan.overrides) - 0.004 * len(plan.smoothing))
        return self.make_trial(plan, ppl, 0.0)


@pytest.fixture(scope="module")
def planted():
    """The planted model and one weights-only scan, shared: the serving options do not change the scan."""
    model, tok = planted_tiny()
    return model, tok, scan_with_stats(model, tok, _cfg().scan_config(progress=False))


@pytest.fixture
def run_search(planted):
    def run(cfg):
        model, tok, scan = planted
        s = Scored(model, tok, cfg, progress=False, scan=scan)
        return s, search(model, tok, cfg, searcher=s, progress=False)

    return run


def assert_servable(s: Searcher, r):
    assert check_plan(r.recipe, s.model, s.profile) == []  # the model's own fused groups (ArchSpec)
    for t in r.trials:
        assert s.violations(t.plan) == [], t.label  # nothing unservable was even tried


@pytest.mark.parametrize("kw", [dict(), dict(gpu="ampere")])
def test_vllm_search_emits_only_servable_plans(kw, run_search):
    cfg = _cfg(**kw)
    s, r = run_search(cfg)
    assert_servable(s, r)
    labels = [t.label for t in r.trials]
    assert "mixed-granularity" not in labels and any(sk["label"] == "mixed-granularity" for sk in r.skipped)
    assert ("outliers-fp8" in labels) == (cfg.gpu != "ampere") and ("outliers-bf16" in labels) == (cfg.gpu == "ampere")
    assert any("+keep" in t.label for t in r.trials)  # stage 4 ran, by whole fused groups
    # fused siblings move together and every one of them counts
    for t in r.trials:
        assert t.kept == len(t.plan.kept())
        for g in s.fused:
            assert len({repr(t.plan.overrides.get(n)) for n in g}) == 1, (t.label, g)
    assert r.to_dict()["serve"]["runtime"] == "vllm"


def test_any_profile_still_tries_per_group(run_search):
    s, r = run_search(_cfg(serve="any"))
    assert "mixed-granularity" in [t.label for t in r.trials] and r.skipped == []


def test_optional_kernels_allow_per_group_with_dynamic_activations(run_search):
    s, r = run_search(_cfg(allow_optional_kernels=True))
    assert "mixed-granularity" in [t.label for t in r.trials]
    assert_servable(s, r)
    mixed = next(t for t in r.trials if t.label == "mixed-granularity")
    assert len(mixed.plan.per_group()) % 3 == 0  # q/k/v of a block as one group size


def test_unservable_target_or_keep_is_refused_before_the_scan():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(QDoctorError, match="int8-activations"):
        Searcher(model, tok, FixConfig(target="w8a8-channel-tensor-dynamic", calibration=CAL), progress=False)
    with pytest.raises(QDoctorError, match="--keep fp8"):
        Searcher(model, tok, FixConfig(keep="fp8", gpu="ampere", calibration=CAL), progress=False)
    assert Plan().label == "naive"


class Tied(Searcher):
    """Every plan scores the same (and misses the budget), so the cost alone ranks them."""

    def evaluate(self, plan, windows=None):
        return self.make_trial(plan, self.fp_ppl * 1.10, 0.0)


def test_ties_are_ranked_by_estimated_cost(planted, tmp_path):
    import json

    ms = {"bf16": 1.0, "int8": 0.6, "int8 g128": 0.8, "fp8": 0.5}  # a synthetic table (test fixture)
    table = tmp_path / "gemm.json"
    table.write_text(json.dumps({"rows": [{"M": 2048, "N": 64, "K": 64, "ms": {"graph": ms}}]}))
    model, tok, scan = planted
    cfg = _cfg(gemm_table=str(table))
    s = Tied(model, tok, cfg, progress=False, scan=scan)
    r = search(model, tok, cfg, searcher=s, progress=False)
    assert all(t.cost is not None for t in r.trials)
    assert r.best.cost == min(t.cost for t in r.trials) and r.best.label == "outliers-fp8"
    assert r.cost["speedup_vs_bf16"] == pytest.approx(1 / r.best.cost)
    # naive INT8 everywhere: every layer at 0.6 of BF16 (one shape in the table, all times scale with N·K)
    assert r.naive.cost == pytest.approx(0.6)
