"""INT8 / FP8 quantizers against references written a second way (explicit loops, code tables)."""

import numpy as np
import pytest
import torch

from qdoctor.errors import QDoctorError
from qdoctor.quant import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec
from qdoctor.quant.fake import compute_scale, fake_quantize, quantize
from qdoctor.quant.fp8 import FP8_DTYPE


def _ref_int8_groups(x: np.ndarray, group: int | None, per_row: bool) -> tuple[np.ndarray, np.ndarray]:
    """Loop reference: scale per (row, group) = max|·|/127 (1 if all zero); q = clip(rint(x/s))."""
    rows, k = x.shape
    out = np.zeros_like(x, dtype=np.float64)
    scales = []
    if not per_row:
        a = float(np.abs(x).max())
        s = a / 127 if a > 0 else 1.0
        return np.clip(np.rint(x / s), -127, 127) * s, np.array([s])
    g = group or k
    for r in range(rows):
        for b in range(0, k, g):
            blk = x[r, b:b + g].astype(np.float64)
            a = float(np.abs(blk).max())
            s = np.float32(a) / np.float32(127) if a > 0 else np.float32(1.0)
            out[r, b:b + g] = np.clip(np.rint(blk.astype(np.float32) / s), -127, 127) * s
            scales.append(s)
    return out, np.array(scales)


@pytest.mark.parametrize("gran,group,per_row", [
    (PerTensor(), None, False), (PerChannel(), None, True), (PerToken(), None, True), (PerGroup(16), 16, True),
])
def test_int8_matches_loop_reference(gran, group, per_row):
    torch.manual_seed(0)
    x = torch.randn(8, 64) * torch.logspace(-2, 1, 64)
    x[3] = 0.0  # an all-zero row
    got = fake_quantize(x, QuantSpec("int8", gran, dynamic=isinstance(gran, PerToken)))
    ref, scales = _ref_int8_groups(x.numpy(), group, per_row)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6, atol=1e-7)
    assert torch.all(got[3] == 0)
    s = compute_scale(x, QuantSpec("int8", gran))
    np.testing.assert_allclose(s.flatten().numpy(), scales.astype(np.float32), rtol=1e-7)


@pytest.mark.parametrize("gran", [PerTensor(), PerChannel(), PerGroup(8)])
def test_int8_error_bound_half_scale(gran):
    torch.manual_seed(1)
    x = torch.randn(16, 32) * 5
    spec = QuantSpec("int8", gran)
    s = compute_scale(x, spec)
    err = (fake_quantize(x, spec) - x).abs()
    if isinstance(gran, PerGroup):
        err = err.reshape(16, 4, 8)
    assert torch.all(err <= s / 2 + 1e-6)


def test_int8_codes_and_group_scale_shape():
    x = torch.randn(4, 32)
    q, s = quantize(x, QuantSpec("int8", PerGroup(8)))
    assert q.dtype == torch.int8 and q.shape == x.shape and s.shape == (4, 4)
    assert int(q.abs().max()) == 127  # each group's absmax maps to ±127
    recon = (q.float().reshape(4, 4, 8) * s.unsqueeze(-1)).reshape(4, 32)
    torch.testing.assert_close(recon, fake_quantize(x, QuantSpec("int8", PerGroup(8))))


def _e4m3_table() -> torch.Tensor:
    vals = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
    return vals[torch.isfinite(vals)].unique()


def test_fp8_is_nearest_e4m3_value():
    """Second derivation: nearest entry of the table of all finite E4M3 values."""
    torch.manual_seed(2)
    x = torch.randn(32, 64) * 3
    spec = QuantSpec("fp8", PerChannel())
    s = compute_scale(x, spec)
    got = quantize(x, spec)[0].float()
    table = _e4m3_table()
    scaled = (x / s).clamp(-448, 448)
    dist = (scaled.unsqueeze(-1) - table).abs()
    nearest = table[dist.argmin(-1)]
    two_best = dist.sort(-1).values[..., :2]
    not_tie = (two_best[..., 1] - two_best[..., 0]) > 1e-6
    assert torch.equal(got[not_tie], nearest[not_tie])
    assert float(table.max()) == 448.0


def test_fp8_relative_error_bound():
    x = torch.randn(64, 64)
    spec = QuantSpec("fp8", PerToken(), dynamic=True)
    y = fake_quantize(x, spec)
    s = compute_scale(x, spec)
    normal = (x / s).abs() >= 2 ** -6
    rel = ((y - x).abs() / x.abs())[normal]
    assert float(rel.max()) <= 2 ** -4 + 1e-6


def test_static_scale_clamps_outliers():
    spec = QuantSpec("int8", PerTensor())
    x = torch.tensor([[0.5, -3.0, 10.0]])
    y = fake_quantize(x, spec, scale=torch.tensor(1.0 / 127))
    assert torch.allclose(y, torch.tensor([[0.5039, -1.0, 1.0]]), atol=1e-3)


def test_nan_and_bad_group_are_clear_errors():
    from qdoctor.quant.scales import check_finite

    with pytest.raises(QDoctorError, match="NaN"):
        check_finite(torch.tensor([1.0, float("nan")]), "w")
    with pytest.raises(QDoctorError, match="does not divide"):
        fake_quantize(torch.randn(2, 576), QuantSpec("int8", PerGroup(128)))
    with pytest.raises(QDoctorError):
        PerGroup(0)
