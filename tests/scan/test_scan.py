"""Scan on tiny models: statistics and errors against a second derivation, verdicts on planted
weight outliers and on an engineered activation spike, the config, sensitivity and the CLI."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from helpers import FAMILIES, tiny_model, tiny_tokenizer
from qdoctor.calib.collect import CalibrationConfig, calibration_windows
from qdoctor.calib.observers import LinearInputStats
from qdoctor.errors import QDoctorError
from qdoctor.models.registry import arch_for, block_linear_names
from qdoctor.quant.fake import fake_quantize
from qdoctor.quant.granularity import PerChannel, PerGroup, PerTensor, PerToken
from qdoctor.quant.spec import QuantSpec
from qdoctor.scan import ERROR_KEYS, ScanConfig, ScanReport, Thresholds, group_size_for, scan, scan_with_stats
from qdoctor.scan.collect import InputRecorder, uniform_token_mask

from qdoctor.stats.quant_error import act_rel_error, output_rel_error, weight_rel_error
from qdoctor.stats.spikes import spike_mask, spike_ratio
from qdoctor.testing import plant_weight_outliers, precision_recall

SMALL = CalibrationConfig(n_samples=4, seqlen=48)
_IDS = {}


def _cfg(**kw):
    return ScanConfig(calibration=kw.pop("calibration", SMALL), progress=False, **kw)


def _ids(cal=SMALL, bos=None):
    """Calibration windows of the tiny tokenizer, tokenized once per (config, bos)."""
    if (cal, bos) not in _IDS:
        _IDS[(cal, bos)] = calibration_windows(tiny_tokenizer(), cal, bos_id=bos)
    return _IDS[(cal, bos)]


def _scan(model, cfg, **kw):
    bos = tiny_tokenizer().bos_token_id if arch_for(model).needs_bos else None
    return scan(model, tiny_tokenizer(), cfg, input_ids=_ids(cfg.calibration, bos), **kw)


# --- pure pieces -------------------------------------------------------------------------------

def test_group_size_fallback():
    assert group_size_for(4096) == 128
    assert group_size_for(576) == 96  # SmolLM2 q/k/v/gate/up
    assert group_size_for(1536) == 128
    assert group_size_for(640) == 128
    assert group_size_for(100, 128) == 100


def test_recorder_matches_linear_input_stats_and_keeps_every_spike():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, 16, generator=g)
    x[1, 0, 3] = 500.0  # spikes: one token in sample 1, two in sample 4
    x[4, 7, 5] = -300.0
    x[4, 9, 0] = 250.0
    mask = uniform_token_mask(6, 40, 50, seed=0)
    assert int(mask.sum()) == 50
    rec, ref = InputRecorder(16, mask, spike_factor=20.0, max_spike_rows=100), LinearInputStats(16)
    for b in range(0, 6, 4):  # batches of whole samples, like the block forward
        rec(None, (x[b:b + 4],))
        ref.update(x[b:b + 4])
    torch.testing.assert_close(rec.channel_absmax, ref.channel_absmax)
    torch.testing.assert_close(rec.token_absmax, ref.token_absmax)
    spikes = spike_mask(rec.token_absmax, 20.0)
    assert int(spikes.sum()) == 3 == rec.spike_tokens
    rows, samples, weights, is_spike = rec.error_rows()
    assert int(is_spike.sum()) == 3 and sorted(samples[is_spike].tolist()) == [1, 4, 4]
    assert sorted(rows[is_spike].abs().amax(dim=1).tolist()) == [250.0, 300.0, 500.0]
    # Uniform rows are the sampled positions minus spikes; weights re-scale each stratum to its count.
    assert int((~is_spike).sum()) == int((mask & ~spikes).sum())
    assert float(weights.sum()) == pytest.approx(6 * 40)
    # A full-coverage sample gives weight 1 everywhere: the weighted estimate is the exact error.
    full = InputRecorder(16, uniform_token_mask(6, 40, 10_000, 0), 20.0, 100)
    full(None, (x,))
    rows, _, weights, _ = full.error_rows()
    assert rows.shape[0] == 240 and torch.all(weights == 1)


def test_spike_rows_capped_by_uniform_priority_sample():
    x = torch.ones(2, 30, 8)
    x[:, ::2, 0] = 100.0  # 30 spike tokens
    rec = InputRecorder(8, uniform_token_mask(2, 30, 10, 0), 20.0, max_spike_rows=7)
    rec(None, (x,))
    rows, _, weights, is_spike = rec.error_rows()
    assert int(is_spike.sum()) == 7 and rec.spike_tokens == 30
    assert float(weights[is_spike].sum()) == pytest.approx(30)


def test_input_groups_follow_the_norm_pairs():
    llama = tiny_model("llama")
    assert arch_for(llama).input_groups(llama.config) == [
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"),
        ("self_attn.o_proj",), ("mlp.down_proj",)]
    mixtral = tiny_model("mixtral")
    assert arch_for(mixtral).input_groups(mixtral.config) == [
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",)]


def test_config_validation_and_round_trip():
    with pytest.raises(QDoctorError):
        ScanConfig(spike_factor=0.5)
    with pytest.raises(QDoctorError):
        ScanConfig(sensitivity="block")
    with pytest.raises(QDoctorError):
        Thresholds(weight_error=0)
    cfg = ScanConfig(calibration=CalibrationConfig(n_samples=8, seqlen=256), thresholds=Thresholds(spike_ratio=15),
                     error_tokens=512, sensitivity="projection")
    assert ScanConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == ScanConfig(
        calibration=cfg.calibration, thresholds=cfg.thresholds, error_tokens=512, sensitivity="projection")


# --- second derivation: the scan's numbers from a plain full-model forward ---------------------------

def _captured_inputs(model, ids, names):
    """Every named linear's input over the whole calibration set, from an ordinary forward."""
    got = {n: [] for n in names}
    mods = dict(model.named_modules())
    hs = [mods[n].register_forward_pre_hook(lambda _m, a, _n=n: got[_n].append(a[0].detach().clone()))
          for n in names]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hs:
        h.remove()
    return {n: torch.cat(v) for n, v in got.items()}  # (N, L, K)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_stats_and_errors_match_a_direct_computation(family):
    model, tok = tiny_model(family), tiny_tokenizer()
    cfg = _cfg(error_tokens=10_000)  # every token in the error sample → exact, unweighted
    report = scan(model, tok, cfg)  # tokenizes the calibration text itself (the path users take)
    arch = arch_for(model)
    ids = calibration_windows(tok, SMALL, bos_id=tok.bos_token_id if arch.needs_bos else None)
    names = block_linear_names(model, arch)
    assert [f.name for f in report.layers] == names
    inputs = _captured_inputs(model, ids, names)
    for f in report.layers:
        x3 = inputs[f.name].float()
        x = x3.reshape(-1, x3.shape[-1])
        w = model.get_submodule(f.name).weight.detach().float()
        ta = x3.abs().amax(dim=-1)
        assert f.activation.error_tokens == x.shape[0]
        assert f.activation.absmax == pytest.approx(float(x.abs().max()), rel=1e-3)
        assert f.spike_ratio == pytest.approx(spike_ratio(ta), rel=1e-3)
        assert f.weight.max_abs == pytest.approx(float(w.abs().max()), rel=1e-3)
        assert f.weight.group_size == group_size_for(w.shape[1])
        want = {}
        for gname, gran in (("tensor", PerTensor()), ("channel", PerChannel()), ("group", PerGroup(f.weight.group_size))):
            spec = QuantSpec("int8", gran)
            want[f"out_w_{gname}"] = output_rel_error(x, w, spec)
            want[f"w_{gname}"] = weight_rel_error(w, spec)
        y = F.linear(x, w)
        for dtype, qmax in (("int8", 127.0), ("fp8", 448.0)):
            static = QuantSpec(dtype, PerTensor())
            s = torch.tensor(float(x.abs().max()) / qmax)
            want[f"out_a_tensor_static_{dtype}"] = output_rel_error(x, w, None, static, s)
            want[f"a_tensor_static_{dtype}"] = act_rel_error(x, static, s)
            dyn = QuantSpec(dtype, PerTensor(), dynamic=True)  # one scale per calibration sequence
            xq = torch.cat([fake_quantize(seq, dyn) for seq in x3])
            want[f"out_a_tensor_dynamic_{dtype}"] = float((F.linear(xq, w) - y).norm() / y.norm())
            want[f"a_tensor_dynamic_{dtype}"] = float((xq - x).norm() / x.norm())
            tokq = QuantSpec(dtype, PerToken(), dynamic=True)
            want[f"out_a_token_dynamic_{dtype}"] = output_rel_error(x, w, None, tokq)
            want[f"a_token_dynamic_{dtype}"] = act_rel_error(x, tokq)
        assert set(f.errors) == set(ERROR_KEYS) == set(want)
        for key in ERROR_KEYS:
            assert f.errors[key] == pytest.approx(want[key], rel=2e-3, abs=1e-6), (f.name, key)


def test_subsampled_errors_estimate_the_full_set_errors():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    cal = CalibrationConfig(n_samples=8, seqlen=64)
    full = _scan(model, _cfg(calibration=cal, error_tokens=100_000))
    sub = _scan(model, _cfg(calibration=cal, error_tokens=128))  # 25% of the tokens
    for a, b in zip(full.layers, sub.layers):
        assert b.activation.error_tokens < 0.35 * a.activation.error_tokens
        for key in ("out_w_channel", "out_a_tensor_static_int8", "out_a_token_dynamic_int8"):
            assert b.errors[key] == pytest.approx(a.errors[key], rel=0.15), (a.name, key)


# --- verdicts ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_planted_weight_outliers_are_found_exactly(family):
    model, tok = tiny_model(family), tiny_tokenizer()
    clean = _scan(model, _cfg())
    assert clean.summary.weight_outlier_layers == [] and clean.summary.counts["ok"] == len(clean.layers)
    planted = plant_weight_outliers(model, blocks=(0,), dims=3, magnitude=100.0, seed=0)
    report = _scan(model, _cfg())
    assert precision_recall(report.summary.weight_outlier_layers, planted.layers) == (1.0, 1.0)
    f = report.layer(planted.layers[0])
    assert f.verdict == "weight-outlier" and f.weight.max_abs >= 90
    assert {int(j) for j, _ in f.weight.top_dims[:3]} == set(planted.dims[0])
    assert f.errors["out_w_channel"] > 0.01 and f.errors["out_w_group"] <= f.errors["out_w_channel"]
    assert "hold weight outliers: layer 0 q_proj/k_proj/v_proj/gate_proj/up_proj" in report.summary.lines[1]



def test_summary_names_an_outlier_dimension_whose_error_stays_below_the_bound():
    """The cause (an input dim far above the median) without the symptom (per-channel output
    error above the bound) is no weight-outlier verdict, and the summary says why in numbers."""
    model = tiny_model("llama")
    clean = _scan(model, _cfg())
    assert "largest input-dim max/median" in clean.summary.lines[1] and "≤ 25" in clean.summary.lines[1]
    planted = plant_weight_outliers(model, blocks=(0,), dims=3, magnitude=100.0, seed=0)
    report = _scan(model, _cfg(thresholds=Thresholds(weight_error=0.99)))
    assert report.summary.weight_outlier_layers == []
    top = max(report.layers, key=lambda f: f.weight.max_median_ratio)
    assert top.name in planted.layers and top.weight.max_median_ratio > 25
    line = report.summary.lines[1]
    assert line.startswith("0 of ") and f"> 25 in {top.name}, but its per-channel INT8" in line
    assert f"{100 * top.errors['out_w_channel']:.2f}% ≤ 99%" in line

def _engineer_spike(model, token_id: int, scale: float = 60.0):
    """A massive activation at every occurrence of ``token_id`` in block 0's down_proj input:
    its embedding is scaled up (so its post-attention hidden state points along it) and one
    gate/up row is aligned with that direction (so act(gate)·up is quadratic in the alignment)."""
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[token_id] *= scale
        mlp = model.model.layers[0].mlp
        d = emb[token_id] / emb[token_id].norm()
        mlp.gate_proj.weight[7] = 4.0 * d
        mlp.up_proj.weight[7] = 4.0 * d


def test_engineered_activation_spike_is_found_with_its_token_and_channel():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    ids = _ids()
    common = int(torch.bincount(ids.flatten()).argmax())
    _engineer_spike(model, common)
    report = _scan(model, _cfg())
    assert report.summary.activation_spike_layers == ["model.layers.0.mlp.down_proj"]
    f = report.layer("model.layers.0.mlp.down_proj")
    a = f.activation
    assert f.verdict == "activation-spike" and f.spike_ratio > 10
    assert next(iter(a.spike_token_ids)) == str(common)
    assert a.spike_token_text[str(common)] == tok.decode([common])
    assert a.spike_channels[0][0] == 7
    assert a.spike_tokens >= int((ids == common).sum()) * 0.9
    # Per-tensor static INT8 wrecks the typical token; per-token dynamic does not.
    assert a.typical_token_errors["tensor_static_int8"] > 5 * a.typical_token_errors["token_dynamic_int8"]
    assert report.summary.lines[0].startswith("1 of 14 linear layers concentrate activation spikes: layer 0 down_proj")


def test_scan_reuses_calibration_and_restores_nothing():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    ref = copy.deepcopy(model.state_dict())
    report, stats = scan_with_stats(model, tok, _cfg(), input_ids=_ids())
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k])  # the scan changes nothing
    name = report.layers[3].name
    assert stats.act_absmax(name) == pytest.approx(report.layer(name).activation.absmax, rel=1e-3)
    assert stats[name].token_absmax.shape == (SMALL.n_samples, SMALL.seqlen)


@pytest.mark.parametrize("mode", ["projection", "layer"])
def test_sensitivity(mode):
    import qdoctor

    model, tok = tiny_model("llama"), tiny_tokenizer()
    cfg = _cfg(sensitivity=mode, sensitivity_windows=1, sensitivity_seqlen=32)
    report = _scan(model, cfg)
    s = report.sensitivity
    assert s["mode"] == mode and s["windows"] == 1 and s["baseline_ppl"] > 1
    assert len(s["results"]) == (7 if mode == "projection" else 14)
    assert not any(isinstance(m, qdoctor.quant.QuantLinear) for m in model.modules())
    key = "delta_pct" if mode == "layer" else "projection_delta_pct"
    assert all(key in f.sensitivity for f in report.layers)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("llama", "gemma3_text")])
def test_scan_runs_on_every_family(family):
    model = tiny_model(family)
    report = _scan(model, _cfg(calibration=CalibrationConfig(n_samples=2, seqlen=32)))
    assert [f.name for f in report.layers] == block_linear_names(model)
    assert ScanReport.from_dict(json.loads(json.dumps(report.to_dict()))).to_dict() == report.to_dict()
