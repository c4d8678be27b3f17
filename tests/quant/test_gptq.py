"""GPTQ's math (``quant.gptq``) against a column-by-column reference written the OBS way."""

import pytest
import torch

from qdoctor.errors import QDoctorError
from qdoctor.quant.fake import compute_scale, fake_quantize
from qdoctor.quant.gptq import GPTQConfig, HessianAccumulator, gptq_quantize
from qdoctor.quant.granularity import PerChannel, PerGroup, PerTensor
from qdoctor.quant.spec import QuantSpec

SPECS = [QuantSpec(d, g) for d in ("int8", "fp8") for g in (PerTensor(), PerChannel(), PerGroup(16))]


def correlated_layer(n=24, k=64, rows=512, seed=0):
    """W (n, k) and inputs X (rows, k) with strongly correlated channels and a few large ones."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    x = torch.randn(rows, 8, generator=g) @ torch.randn(8, k, generator=g) + 0.3 * torch.randn(rows, k, generator=g) @ mix
    x[:, :3] *= 6.0  # outlier channels
    w = torch.randn(n, k, generator=g) * 0.05
    return w, x


def hessian_of(x):
    acc = HessianAccumulator(x.shape[1])
    acc.update(x)
    return acc.hessian()


def reference_gptq(W, H, spec, scale, dampening=0.01, act_order=False):
    """Column by column, no lazy batches: the OBS update with an explicit inverse Hessian of the
    columns still free, downdated (Gaussian elimination of the rounded column) after each one."""
    W = W.double().clone()
    H = H.double().clone()
    n, k = W.shape
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    per_elem = compute_scale_elements(scale, spec, W.shape)
    order = torch.argsort(torch.diagonal(H), descending=True).tolist() if act_order else list(range(k))
    Hinv = torch.linalg.inv(H + torch.eye(k, dtype=H.dtype) * dampening * torch.diagonal(H).mean())
    Q = torch.zeros_like(W)
    free = list(order)
    col_spec = QuantSpec(spec.dtype, PerChannel())
    for j in order:
        q = fake_quantize(W[:, j:j + 1].float(), col_spec, per_elem[:, j:j + 1]).double()
        Q[:, j] = q[:, 0]
        free.remove(j)
        W[:, free] -= ((W[:, j] - q[:, 0]) / Hinv[j, j])[:, None] * Hinv[j, free][None, :]
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
    return Q.float()


def compute_scale_elements(scale, spec, shape):
    n, k = shape
    if isinstance(spec.granularity, PerGroup):
        g = spec.granularity.group_size
        return torch.stack([scale[:, c // g, 0] for c in range(k)], dim=1)
    return torch.ones(n, k) * scale.float()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.dtype}-{s.granularity.name}")
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_matches_reference_beats_rtn_and_stays_on_grid(spec, act_order):
    w, x = correlated_layer()
    H = hessian_of(x)
    cfg = GPTQConfig(act_order=act_order, block_size=20)  # 20 ∤ 64: a partial last block
    w_hat, scale = gptq_quantize(w, H, spec, config=cfg)
    assert torch.equal(scale, compute_scale(w, spec))  # QuantLinear's grid
    assert torch.equal(fake_quantize(w_hat, spec, scale), w_hat)  # on the grid
    ref = reference_gptq(w, H, spec, scale, act_order=act_order)
    assert torch.allclose(w_hat, ref, rtol=1e-5, atol=1e-7)
    y = x @ w.T
    err_gptq = (y - x @ w_hat.T).norm()
    err_ref = (y - x @ ref.T).norm()
    err_rtn = (y - x @ fake_quantize(w, spec).T).norm()
    assert err_gptq == pytest.approx(float(err_ref), rel=1e-3)
    assert err_gptq < err_rtn


def test_block_size_does_not_change_the_result():
    w, x = correlated_layer(seed=1)
    H = hessian_of(x)
    spec = QuantSpec("int8", PerChannel())
    a, _ = gptq_quantize(w, H, spec, config=GPTQConfig(block_size=1))
    b, _ = gptq_quantize(w, H, spec, config=GPTQConfig(block_size=128))
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_dead_columns_and_given_scale():
    w, x = correlated_layer(seed=2)
    x[:, 5] = 0.0
    H = hessian_of(x)
    spec = QuantSpec("int8", PerGroup(16))
    scale = compute_scale(w, spec) * 1.5
    w_hat, s = gptq_quantize(w, H, spec, scale=scale)
    assert s is scale and torch.all(w_hat[:, 5] == 0)
    assert torch.equal(fake_quantize(w_hat, spec, scale), w_hat)
    assert torch.allclose(w_hat, reference_gptq(w, H, spec, scale), rtol=1e-5, atol=1e-7)


def test_hessian_accumulator_merges_and_matches_definition():
    _, x = correlated_layer(rows=100)
    a, b, whole = HessianAccumulator(64), HessianAccumulator(64), HessianAccumulator(64)
    a.update(x[:30])
    b.update(x[30:].reshape(2, 35, 64))
    whole.update(x)
    merged = a.merge(b)
    assert merged.count == 100
    expected = 2 * x.double().T @ x.double() / 100
    assert torch.allclose(merged.hessian().double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(whole.hessian(), merged.hessian(), rtol=1e-6, atol=1e-6)
    with pytest.raises(QDoctorError):
        HessianAccumulator(64).hessian()


def test_config_round_trip_and_refusals():
    cfg = GPTQConfig(dampening=0.05, act_order=True, block_size=64, propagate=True)
    assert GPTQConfig.from_dict(cfg.to_dict()) == cfg
    assert GPTQConfig.from_dict({}) == GPTQConfig()
    for bad in ({"dampening": 0}, {"dampening": "x"}, {"act_order": "yes"}, {"block_size": 0},
                {"block_size": 1.5}, {"damp": 0.1}):
        with pytest.raises(QDoctorError):
            GPTQConfig.from_dict(bad)
    with pytest.raises(QDoctorError):
        GPTQConfig.from_dict([1])


def test_shared_input_layers_round_as_if_alone():
    """q/k/v (or gate/up) read one input: rounding their stacked rows in one loop gives each layer
    exactly what GPTQ gives it alone — mixed dtypes and granularities, with and without act-order."""
    from qdoctor.quant.gptq import gptq_quantize_shared
    w, x = correlated_layer(n=40, k=64)
    H = hessian_of(x)
    parts = [w[:16], w[16:24] * 3.0, w[24:]]
    specs = [QuantSpec("int8", PerChannel()), QuantSpec("fp8", PerGroup(16)), QuantSpec("int8", PerTensor())]
    for act_order in (False, True):
        cfg = GPTQConfig(act_order=act_order, block_size=24)
        shared = gptq_quantize_shared(parts, H, specs, config=cfg)
        for part, spec, (q, s) in zip(parts, specs, shared):
            alone_q, alone_s = gptq_quantize(part, H, spec, config=cfg)
            assert torch.equal(s, alone_s)
            torch.testing.assert_close(q, alone_q, rtol=0, atol=1e-6)
            assert torch.equal(fake_quantize(q, spec, s), q)
    with pytest.raises(QDoctorError, match="one spec and scale per weight"):
        gptq_quantize_shared(parts, H, specs[:2])
