"""One Searcher: on a block-streamed model it scores every plan as on the model in memory."""

import pytest
import torch

from qdoctor.calib.collect import CalibrationConfig
from qdoctor.errors import QDoctorError
from qdoctor.models.lazy import load_lazy
from qdoctor.models.registry import get_blocks
from qdoctor.policy.search import FixConfig, Plan, Searcher, group_scheme, keep_scheme, search
from qdoctor.transforms.rotation import RotationStep
from qdoctor.transforms.smoothing import SmoothingStep
from tests.helpers import cli_reports_whole_and_streamed, save_tiny, tiny_model, tiny_tokenizer


def _config(**kw):
    cal = CalibrationConfig(n_samples=4, seqlen=32, sample_rows=64, holdout_fraction=0.2)
    return FixConfig(calibration=cal, eval_windows=2, eval_seqlen=64, **kw)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "llama"
    save_tiny("llama", d)
    tok = tiny_tokenizer()
    cfg = _config(budget_pct=0.5)
    eager = Searcher(tiny_model("llama").eval(), tok, cfg, progress=False)
    lazy = Searcher(load_lazy(d, dtype=torch.float32, device="cpu"), tok, cfg, progress=False)
    return eager, lazy


def test_fp_perplexity_and_evidence_match(pair):
    eager, lazy = pair
    assert lazy.fp_ppl == pytest.approx(eager.fp_ppl, rel=1e-5)
    assert set(lazy.evidence) == set(eager.evidence)
    for n, e in eager.evidence.items():
        f = lazy.evidence[n]
        assert f.spike_ratio == pytest.approx(e.spike_ratio, rel=1e-5)
        assert f.out_w_channel == pytest.approx(e.out_w_channel, rel=1e-4, abs=1e-8)
        assert f.weight_absmax == pytest.approx(e.weight_absmax, rel=1e-6)


def test_plans_score_the_same(pair):
    eager, lazy = pair
    t = eager.target
    first = eager.names[0]
    plans = [
        Plan(),
        Plan(smoothing=[SmoothingStep("smoothquant", 0.5)], label="sq"),
        Plan(smoothing=[SmoothingStep("bismooth-max", 0.5, (first,))], label="bis"),
        Plan(overrides={eager.names[5]: keep_scheme(t, "bf16"), eager.names[1]: group_scheme(t, 32)}, label="mixed"),
        # a rotated plan handed the (unrotated) scan statistics: recalibrated in its own basis
        Plan(smoothing=[SmoothingStep("smoothquant", 0.5)], label="rot", rotation=RotationStep(r4=True)),
    ]
    for plan in plans:
        a, b = eager.evaluate(plan), lazy.evaluate(plan)
        assert b.ppl == pytest.approx(a.ppl, rel=1e-4), plan.label
    # nothing stays materialized, and the whole-model searcher left its model as it was
    assert all(p.is_meta for blk in get_blocks(lazy.model) for p in blk.parameters())
    fresh = tiny_model("llama").eval()
    for (k, v), (k2, v2) in zip(eager.model.state_dict().items(), fresh.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def test_search_picks_the_same_plan(pair):
    eager, lazy = pair
    a = search(None, None, searcher=eager, progress=False)
    b = search(None, None, searcher=lazy, progress=False)
    assert [t.label for t in b.trials] == [t.label for t in a.trials]
    assert b.best.label == a.best.label and b.met == a.met
    assert b.best.ppl == pytest.approx(a.best.ppl, rel=1e-4)


def test_stream_rejects_task_metric(tmp_path):
    save_tiny("llama", tmp_path / "m")
    tok = tiny_tokenizer()
    lazy = load_lazy(tmp_path / "m", dtype=torch.float32, device="cpu")
    with pytest.raises(QDoctorError, match="perplexity metric only"):
        Searcher(lazy, tok, _config(metric="tasks:piqa"), progress=False)
    assert lazy.qdoctor_lazy.loads == 0  # refused before any block was read


def test_fix_cli_stream_matches_whole_model(tmp_path, capsys):
    from qdoctor.cli import main

    save_tiny("llama", tmp_path / "m")
    a, b = cli_reports_whole_and_streamed(
        tmp_path, ["fix", "--model", str(tmp_path / "m"), "--device", "cpu", "--dtype", "fp32", "--calib-samples", "4",
                   "--calib-seqlen", "32", "--sample-rows", "64", "--eval-windows", "1", "--eval-seqlen", "64",
                   "--limit", "1", "--seqlen", "64", "--budget", "50"], ok=(0, 3))
    assert b["plan"] == a["plan"]
    for k in ("fp_ppl", "naive_ppl", "planned_ppl"):
        assert b["verification"][k] == pytest.approx(a["verification"][k], rel=1e-4), k
    capsys.readouterr()
    assert main(["fix", "--model", str(tmp_path / "m"), "--stream", "--metric", "tasks:piqa"]) == 2
    assert "perplexity metric only" in capsys.readouterr().err
