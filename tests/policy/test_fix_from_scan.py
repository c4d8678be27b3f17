"""One diagnosis: ``qdoctor fix --scan scan.json`` reuses a saved scan instead of calibrating, and
finds the plan that a fix with its own scan finds."""

import json

import pytest
import torch

from policy.test_fix_cli import SMALL
from qdoctor.calib.collect import CalibrationConfig, CalibrationStats, calibrate
from qdoctor.cli import main
from qdoctor.scan import ScanConfig
from qdoctor.scan.run import scan_with_stats
from tests.helpers import tiny_model, tiny_tokenizer

SCAN = ["--calib-samples", "4", "--calib-seqlen", "64", "--sample-rows", "32", "--quiet"]


def _fix(model_dir, tmp_path, name, *extra):
    js = tmp_path / f"{name}.json"
    code = main(["fix", "--model", str(model_dir), "--target", "w8a8-tensor-static", "--budget", "5%", *SMALL,
                 "--json", str(js), *extra])
    assert code in (0, 3)
    return json.loads(js.read_text())


def test_fix_from_a_saved_scan_finds_the_same_plan(tiny_llama_dir, tmp_path, monkeypatch):
    scan_js = tmp_path / "scan.json"
    assert main(["scan", "--model", str(tiny_llama_dir), *SCAN, "--for-fix", "--json", str(scan_js)]) == 0
    saved = json.loads(scan_js.read_text())
    assert saved["statistics"] == "scan.stats.safetensors" and (tmp_path / saved["statistics"]).is_file()
    assert saved["config"]["calibration"]["holdout_fraction"] == 0.2

    own = _fix(tiny_llama_dir, tmp_path, "own")
    import qdoctor.policy.search as S

    def no_scan(*a, **k):
        raise AssertionError("fix --scan must not scan (calibrate) again")

    monkeypatch.setattr(S, "scan_with_stats", no_scan)
    reused = _fix(tiny_llama_dir, tmp_path, "reused", "--scan", str(scan_js))
    assert [t["label"] for t in reused["trials"]] == [t["label"] for t in own["trials"]]
    assert reused["plan"] == own["plan"] and reused["recipe"] == own["recipe"]
    for a, b in zip(own["trials"], reused["trials"]):
        assert b["ppl"] == a["ppl"], a["label"]
    assert reused["verification"] == own["verification"]


def test_fix_refuses_a_scan_made_with_other_settings(tiny_llama_dir, tmp_path, capsys):
    plain = tmp_path / "plain.json"
    plain_scan = [a for a in SCAN if a not in ("--sample-rows", "32")]  # without --for-fix it keeps no rows
    assert main(["scan", "--model", str(tiny_llama_dir), *plain_scan, "--json", str(plain)]) == 0
    capsys.readouterr()
    assert main(["fix", "--model", str(tiny_llama_dir), *SMALL, "--scan", str(plain)]) == 2
    assert "re-run it with --for-fix" in capsys.readouterr().err
    other = tmp_path / "other.json"
    assert main(["scan", "--model", str(tiny_llama_dir), *SCAN, "--for-fix", "--seed", "3", "--json", str(other)]) == 0
    capsys.readouterr()
    assert main(["fix", "--model", str(tiny_llama_dir), *SMALL, "--scan", str(other)]) == 2
    err = capsys.readouterr().err
    assert "seed 3 (fix: 0)" in err and len(err.strip().splitlines()) == 1
    assert main(["scan", "--model", str(tiny_llama_dir), *SCAN, "--for-fix"]) == 2  # where would it go?
    assert "give --json" in capsys.readouterr().err


def test_scan_statistics_are_the_calibration_statistics_and_round_trip(tmp_path):
    """The scan's recorder is the calibration recorder: same channel/token maxima and the same
    sampled rows as ``calibrate`` with that config; consumers of one input share one object;
    save → load gives the tensors back bit for bit."""
    model, tok = tiny_model("llama").eval(), tiny_tokenizer()
    cal = CalibrationConfig(n_samples=4, seqlen=32, sample_rows=16, holdout_fraction=0.2)
    _, from_scan = scan_with_stats(model, tok, ScanConfig(calibration=cal, progress=False))
    plain = calibrate(model, tok, cal)
    assert sorted(from_scan.layers) == sorted(plain.layers)
    for name, st in plain.layers.items():
        other = from_scan[name]
        assert torch.equal(other.channel_absmax, st.channel_absmax), name
        assert torch.equal(other.token_absmax, st.token_absmax), name
        assert torch.equal(other.rows, st.rows), name
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    assert plain[q] is plain[k] and from_scan[q] is from_scan[k]
    path = tmp_path / "s.safetensors"
    plain.save(str(path))
    back = CalibrationStats.load(str(path))
    assert back.config == cal and torch.equal(back.input_ids, plain.input_ids) and back[q] is back[k]
    for name, st in plain.layers.items():
        assert torch.equal(back[name].rows, st.rows) and torch.equal(back[name].token_absmax, st.token_absmax)
        assert back.act_absmax(name, "percentile:99") == pytest.approx(plain.act_absmax(name, "percentile:99"))
