"""The ``mse`` weight observer (clip search): never worse than absmax per group, equal to a
brute-force search written a second way, clipping heavy tails, and what the export writes."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qdoctor
from qdoctor.errors import QDoctorError
from qdoctor.quant.fake import CLIP_GRID, SCALE_OBSERVERS, clip_error, compute_scale
from qdoctor.quant.granularity import PerChannel, PerGroup, PerTensor, granularity_from_str
from qdoctor.quant.spec import WEIGHT_OBSERVERS, LayerScheme, QuantSpec, Scheme

E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
E4M3_NP = E4M3[torch.isfinite(E4M3)].unique().numpy()  # every finite E4M3 value, sorted


def ref_row_error(v: list[float], scale: float, dtype: str) -> float:
    """Σ (v − D(Q(v)))² for one group, in numpy float64: INT8 by numpy's round-half-even and a
    clip, FP8 by the nearest entry of the table of all finite E4M3 values (clipped to ±448)."""
    x = np.asarray(v, dtype=np.float64)
    if dtype == "int8":
        q = np.clip(np.round(x / scale), -127, 127)
    else:
        r = np.clip(x / scale, -448, 448)
        i = np.clip(np.searchsorted(E4M3_NP, r), 1, len(E4M3_NP) - 1)
        lo, hi = E4M3_NP[i - 1], E4M3_NP[i]
        q = np.where(np.abs(r - lo) <= np.abs(hi - r), lo, hi)
    return float(np.sum((x - q * scale) ** 2))


def ref_search(groups: list[list[float]], qmax: float, dtype: str) -> list[list[float]]:
    """For each group, [error(c) for c in CLIP_GRID] with s = c·max|v|/qmax (loops only)."""
    out = []
    for v in groups:
        a = max(abs(x) for x in v)
        out.append([ref_row_error(v, max(c * a / qmax, torch.finfo(torch.float32).tiny) if a > 0 else 1.0, dtype)
                    for c in CLIP_GRID])
    return out


def groups_of(w: torch.Tensor, gran) -> list[list[float]]:
    if isinstance(gran, PerTensor):
        return [w.flatten().tolist()]
    if isinstance(gran, PerGroup):
        return w.reshape(-1, gran.group_size).tolist()
    return w.tolist()


def test_the_weight_observers_are_the_names_a_spec_accepts():
    assert set(SCALE_OBSERVERS) == set(WEIGHT_OBSERVERS)
    assert CLIP_GRID[0] == 1.0 and min(CLIP_GRID) == pytest.approx(0.3)


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
@pytest.mark.parametrize("gran", ["tensor", "channel", "group:4"])
def test_mse_weight_scale_is_the_brute_force_argmin(dtype, gran):
    torch.manual_seed(1)
    w = torch.distributions.StudentT(2.0).sample((8, 32))
    spec = QuantSpec(dtype, granularity_from_str(gran), observer="mse")
    s = compute_scale(w, spec).reshape(-1).double()
    errs = torch.tensor(ref_search(groups_of(w, spec.granularity), spec.qmax, dtype))
    amax = torch.tensor([max(abs(x) for x in g) for g in groups_of(w, spec.granularity)], dtype=torch.float64)
    chosen = torch.tensor([ref_row_error(g, float(s[i]), dtype) for i, g in enumerate(groups_of(w, spec.granularity))])
    best = errs.min(dim=1)
    # the search found the grid's minimum (up to the fp32 rounding of its scale vs the fp64 one here)
    assert torch.all(chosen <= best.values * (1 + 1e-5) + 1e-9 * amax.square())
    # where the minimum is clear (next-best grid point ≥ 1e-4 worse) the scales agree exactly in ratio
    ratio = torch.tensor(CLIP_GRID, dtype=torch.float64)[best.indices]
    second = errs.sort(dim=1).values[:, 1]
    clear = second > best.values * (1 + 1e-4)
    assert clear.any()
    torch.testing.assert_close(s[clear], (ratio * amax / spec.qmax)[clear], rtol=1e-6, atol=0)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 6), cols=st.sampled_from([8, 16]), dtype=st.sampled_from(["int8", "fp8"]),
       gran=st.sampled_from(["tensor", "channel", "group:8"]), tail=st.floats(1.0, 30.0), seed=st.integers(0, 10**6))
def test_mse_weight_error_never_exceeds_absmax_for_any_group(rows, cols, dtype, gran, tail, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, cols, generator=g).pow(tail)
    ab = QuantSpec(dtype, granularity_from_str(gran))
    ms = QuantSpec(dtype, granularity_from_str(gran), observer="mse")
    e_ab = clip_error(w, ab, compute_scale(w, ab) * ab.qmax)
    e_ms = clip_error(w, ms, compute_scale(w, ms) * ms.qmax)
    assert e_ms.shape == e_ab.shape
    assert torch.all(e_ms <= e_ab * (1 + 1e-6))


def test_heavy_tails_get_c_below_one():
    """Per tensor (many elements share a scale) clipping the tail pays; per INT8 row it rarely
    does (one clipped element costs (x − a)², the rounding saved is only ~K·s²/12)."""
    torch.manual_seed(0)
    heavy = torch.distributions.StudentT(2.0).sample((64, 256))
    for spec in (QuantSpec("int8", PerTensor(), observer="mse"), QuantSpec("fp8", PerChannel(), observer="mse")):
        s_mse, s_abs = compute_scale(heavy, spec), compute_scale(heavy, QuantSpec(spec.dtype, spec.granularity))
        assert float((s_mse / s_abs).min()) < 0.97 and torch.all(s_mse <= s_abs)
    w = torch.randn(256, 1024) * 0.02
    w[3, 5] = 2.0  # one planted outlier weight: per tensor, clipping it pays
    t = QuantSpec("int8", PerTensor(), observer="mse")
    assert float(compute_scale(w, t)) < 0.8 * float(compute_scale(w, QuantSpec("int8", PerTensor())))


def test_blocked_rows_give_the_same_errors():
    torch.manual_seed(0)
    w = torch.randn(10, 8)
    for gran in (PerTensor(), PerChannel(), PerGroup(4)):
        spec = QuantSpec("int8", gran)
        a = compute_scale(w, spec) * 127 * 0.9
        whole = clip_error(w, spec, a)
        blocked = clip_error(w, spec, a, max_elems=16)  # blocks of 2 rows
        torch.testing.assert_close(blocked, whole)


def test_weight_observer_validation():
    with pytest.raises(QDoctorError, match="weights take observer"):
        LayerScheme(QuantSpec(observer="percentile:99"), None)
    with pytest.raises(QDoctorError, match="dynamic activations"):
        LayerScheme(QuantSpec(), QuantSpec(granularity=granularity_from_str("token"), dynamic=True, observer="mse"))
    ls = LayerScheme(QuantSpec(observer="mse"), QuantSpec(granularity=PerTensor(), observer="mse"))
    assert LayerScheme.from_dict(ls.to_dict()) == ls
    assert ls.to_dict()["weights"]["observer"] == "mse"


def test_export_writes_the_searched_weight_scale(tiny_llama_dir, tmp_path):
    from export.ct_reference import read_tensors

    from qdoctor.export import export_checkpoint
    from qdoctor.quant.linear import QuantLinear

    scheme = Scheme.from_dict({"name": "mse", "default": {
        "weights": {"dtype": "int8", "granularity": "channel", "observer": "mse"},
        "activations": {"dtype": "int8", "granularity": "tensor", "dynamic": False, "observer": "mse"}}})
    model, tok = qdoctor.load(str(tiny_llama_dir), dtype="fp32", device="cpu")
    stats = qdoctor.calibrate(model, tok, qdoctor.CalibrationConfig(n_samples=2, seqlen=32, sample_rows=32))
    qdoctor.quantize(model, scheme, calibration=stats, progress=False)
    export_checkpoint(model, tok, tmp_path / "ckpt", progress=False)
    t = read_tensors(tmp_path / "ckpt")
    clipped = 0
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            torch.testing.assert_close(t[f"{name}.weight_scale"].reshape(-1), m.weight_scale.reshape(-1),
                                       rtol=0, atol=0)
            torch.testing.assert_close(t[f"{name}.input_scale"].reshape(()), m.input_scale, rtol=0, atol=0)
            absmax_scale = compute_scale(m.weight.detach(), QuantSpec("int8", PerChannel()))
            clipped += int((m.weight_scale < absmax_scale).sum())
    assert clipped > 0  # the search moved some rows off absmax: the test can tell the two apart
    qc = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    group = next(iter(qc["config_groups"].values()))
    assert group["weights"]["observer"] == "memoryless_mse"
    assert "int8 per-channel (mse clip search)" in (tmp_path / "ckpt" / "README.md").read_text()


def test_eval_scheme_file_with_mse_observers(tiny_llama_dir, tmp_path):
    """``qdoctor eval --scheme-file`` reads ``observer: mse`` on weights and activations, and its
    perplexity is the API's for the same scheme and calibration (512 sampled rows added for mse)."""
    from qdoctor.cli import main
    from qdoctor.policy.recipe import Recipe

    spec = {"name": "mse-file", "default": {
        "weights": {"dtype": "int8", "granularity": "tensor", "observer": "mse"},
        "activations": {"dtype": "int8", "granularity": "tensor", "dynamic": False, "observer": "mse"}}}
    (tmp_path / "s.yaml").write_text(json.dumps(spec))
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(tiny_llama_dir), "--scheme-file", str(tmp_path / "s.yaml"), "--seqlen", "64",
                 "--limit", "1", "--calib-samples", "2", "--calib-seqlen", "32", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["results"][1]
    assert row["scheme"] == "mse-file"
    model, tok = qdoctor.load(str(tiny_llama_dir), dtype="fp32", device="cpu")
    from qdoctor.calib.text import text_source
    from qdoctor.eval.perplexity import token_windows
    from qdoctor.models.registry import bos_token_id

    windows = token_windows(tok, text_source("wikitext2:test"), 64, bos_token_id(model, tok))
    recipe = Recipe.of(Scheme.from_dict(spec), qdoctor.CalibrationConfig(n_samples=2, seqlen=32))
    assert recipe.calibration_config().sample_rows == 512
    ppl, _ = recipe.perplexity(model, tok, windows, limit=1)
    assert row["ppl"] == pytest.approx(ppl.ppl, rel=1e-9)
