"""The ``mse`` static activation observer: a brute-force search over every calibration token when
the sample holds them all, never worse than absmax on the rows, spike tokens counted exactly
from the per-token maxima, valid after smoothing, and what recipes do with it."""

import numpy as np
import pytest
import torch

from qdoctor.calib.collect import CalibrationConfig
from qdoctor.calib.observers import LinearInputStats, sampled_clip_error
from qdoctor.errors import QDoctorError
from qdoctor.quant.fake import CLIP_GRID
from qdoctor.quant.granularity import PerTensor
from qdoctor.quant.spec import QuantSpec, Scheme
from qdoctor.transforms.smoothing import SmoothingStep

INT8, FP8 = QuantSpec("int8", PerTensor()), QuantSpec("fp8", PerTensor())
E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
E4M3 = E4M3[torch.isfinite(E4M3)].unique().numpy()


def ref_error(x: np.ndarray, a: float, dtype: str) -> float:
    """Σ (x − D(Q(x; a/qmax)))² in numpy float64 (INT8: round-half-even and clip; FP8: the
    nearest entry of the E4M3 table)."""
    if dtype == "int8":
        s = a / 127
        q = np.clip(np.round(x / s), -127, 127)
    else:
        s = a / 448
        r = np.clip(x / s, -448, 448)
        i = np.clip(np.searchsorted(E4M3, r), 1, len(E4M3) - 1)
        q = np.where(np.abs(r - E4M3[i - 1]) <= np.abs(E4M3[i] - r), E4M3[i - 1], E4M3[i])
    return float(((x - q * s) ** 2).sum())


def ref_search(x: np.ndarray, dtype: str) -> tuple[float, list[float]]:
    """(absmax, [E(c·absmax) for c in CLIP_GRID]) over every token, one grid point at a time."""
    a = float(np.abs(x).max())
    return a, [ref_error(x, c * a, dtype) for c in CLIP_GRID]


def heavy_batches(seed=0, n=3, tokens=40, k=24):
    """Batches (1, tokens, k) of a heavy-tailed mix: N(0, 1)·U⁴·4 (most values small, a few large)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, tokens, k, generator=g) * torch.rand(1, tokens, k, generator=g).pow(4) * 4 for _ in range(n)]


def recorded(batches, sample_rows):
    st = LinearInputStats(batches[0].shape[-1], sample_rows=sample_rows, seed=0)
    for b in batches:
        st.update(b)
    return st


@pytest.mark.parametrize("spec", [INT8, FP8], ids=["int8", "fp8"])
def test_mse_with_every_row_sampled_is_the_brute_force_argmin(spec):
    batches = heavy_batches()
    st = recorded(batches, sample_rows=10_000)  # holds every row: the estimate is the exact sum
    x = torch.cat(batches).reshape(-1, 24).double().numpy()
    a_abs, errs = ref_search(x, spec.dtype)
    a = st.observe("mse", spec)
    best = int(np.argmin(errs))
    assert ref_error(x, a, spec.dtype) <= errs[best] * (1 + 1e-5)
    assert ref_error(x, a, spec.dtype) <= errs[0] * (1 + 1e-5)  # never worse than absmax (c = 1)
    if sorted(errs)[1] > errs[best] * (1 + 1e-4):  # a clear minimum: the same grid point
        assert a == pytest.approx(CLIP_GRID[best] * a_abs, rel=1e-6)
    assert a < a_abs  # heavy tails: the search clips


def test_missing_rows_is_a_clear_error():
    st = recorded(heavy_batches(), sample_rows=0)
    with pytest.raises(QDoctorError, match="sample_rows > 0"):
        st.observe("mse", INT8)
    with pytest.raises(QDoctorError, match="no argument"):
        recorded(heavy_batches(), sample_rows=8).observe("mse:3", INT8)


def test_spike_tokens_missed_by_the_sample_are_counted_from_the_token_maxima():
    """Rare spike tokens outside the sample: the rows alone would clip them hard; with the exact
    per-token maxima the choice lands nearer the optimum over every token."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4000, 32, generator=g)
    spikes = torch.arange(7, 4000, 571)  # 7 spike tokens
    x[0, spikes, 5] = 40.0
    st = recorded([x], sample_rows=64)
    assert float(st.rows.abs().max()) < 40.0  # the sample missed every spike (seeded)
    a_est = st.observe("mse", INT8)
    rows_only = float(CLIP_GRID[int(np.argmin([float(sampled_clip_error(st.rows.float(), INT8, torch.tensor(c * 40.0)))
                                                for c in CLIP_GRID]))]) * 40.0
    a_abs, errs = ref_search(x[0].double().numpy(), "int8")
    a_best = CLIP_GRID[int(np.argmin(errs))] * a_abs
    assert abs(a_est - a_best) < abs(rows_only - a_best)
    assert ref_error(x[0].double().numpy(), a_est, "int8") < ref_error(x[0].double().numpy(), rows_only, "int8")


def test_mse_after_smoothing_reads_the_rescaled_rows():
    batches = heavy_batches(seed=1)
    st = recorded(batches, sample_rows=10_000)
    inv = torch.linspace(0.5, 2.0, 24)
    before = st.observe("mse", INT8)  # remembered for layers sharing the input, forgotten on rescaling
    st.rescale_channels(inv)  # per-token maxima go stale; rows and channel maxima are exact
    x = (torch.cat(batches).reshape(-1, 24) * inv).double().numpy()
    a_abs, errs = ref_search(x, "int8")
    assert st.observe("mse", INT8) == pytest.approx(CLIP_GRID[int(np.argmin(errs))] * a_abs, rel=1e-6)
    assert st.observe("mse", INT8) != before


def test_estimate_is_exact_when_the_sample_holds_every_row():
    st = recorded(heavy_batches(), sample_rows=10_000)
    rows = st.rows.float()
    a = torch.tensor(0.5 * st.tensor_absmax)
    full = sampled_clip_error(rows, INT8, a, st.token_absmax.flatten())
    assert float(full) == pytest.approx(ref_error(rows.double().numpy(), float(a), "int8"), rel=1e-5)


def test_recipes_give_mse_rows_and_no_extra_pass_after_smoothing():
    from qdoctor.policy.recipe import Recipe

    scheme = Scheme.from_dict({"name": "s", "default": {
        "weights": {"dtype": "int8", "granularity": "tensor", "observer": "mse"},
        "activations": {"dtype": "int8", "granularity": "tensor", "dynamic": False, "observer": "mse"}}})
    r = Recipe(scheme=scheme, smoothing=[SmoothingStep(method="smoothquant", alpha=0.5)],
               calibration=CalibrationConfig(n_samples=2, seqlen=16))
    assert r.calibration_config().sample_rows == 512
    assert r.quantization_stats(None, None, None) is None  # mse reads rows, exact after smoothing: no pass
    again = Recipe.from_dict(Recipe.from_dict(r.to_dict()).to_dict())
    assert again.scheme.to_dict() == scheme.to_dict()
    assert again.scheme.default.weights.observer == "mse" and again.scheme.default.activations.observer == "mse"
