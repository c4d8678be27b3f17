"""CPU checks of the kernels' reference semantics against second derivations.

- integer accumulation: float64 product vs an int64 matmul (exact both ways);
- scaled outputs: exact-integer route vs the fp32 fake-quantized product x̂ ŵᵀ (what
  ``qdoctor.quant.QuantLinear`` computes), and per-group with one group vs per-channel;
- quantizers: formulas, half-to-even rounding, clamping, zero rows, and the core's quantizers.
"""

import subprocess
import sys

import pytest
import torch

import qdoctor.kernels as K
from qdoctor.errors import QDoctorError
from qdoctor.kernels import reference as R


def randn(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen) * scale


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def fake_quant_linear(q_x, s_x_col, q_w, s_w_full, bias=None):
    """Second derivation: fp32 dequantize both operands, fp32 matmul (x̂ ŵᵀ + b)."""
    y = (q_x.float() * s_x_col) @ (q_w.float() * s_w_full).T
    return y + bias if bias is not None else y


# ---------------------------------------------------------------- import / availability


def test_import_does_not_import_triton():
    code = "import sys, qdoctor.kernels; assert 'triton' not in sys.modules, 'triton imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check")
def test_not_available_on_cpu():
    assert K.available() is False


# ---------------------------------------------------------------- quantizers


def test_per_token_formula(gen):
    x = randn(gen, 6, 96) * torch.logspace(-3, 2, 6).unsqueeze(1)
    x[2] = 0.0
    q, s = K.quantize_per_token(x)
    absmax = x.abs().amax(dim=1)
    expected_s = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (6,)
    assert torch.equal(s, expected_s)
    assert s[2] == 1.0 and not q[2].any()
    assert torch.equal(q, torch.clamp(torch.round(x / s[:, None]), -127, 127).to(torch.int8))
    nonzero = [0, 1, 3, 4, 5]
    assert torch.equal(q[nonzero].abs().amax(dim=1), torch.full((5,), 127, dtype=torch.int8))
    assert ((q.float() * s[:, None] - x).abs() <= s[:, None] / 2 * (1 + 1e-6)).all()


def test_rounding_is_half_to_even():
    # absmax 127 gives s = 1 exactly, so x / s are the halves themselves.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5]])
    q, s = K.quantize_per_token(x)
    assert s.item() == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 4]]


def test_static_per_tensor_clamps(gen):
    x = randn(gen, 4, 64)
    scale = float(x.abs().max()) / 200  # a too-small calibrated scale: values saturate
    q = K.quantize_per_tensor(x, scale)
    assert torch.equal(q, torch.clamp(torch.round(x / torch.tensor(scale)), -127, 127).to(torch.int8))
    assert int(q.abs().max()) == 127


def test_per_group_is_per_token_of_group_rows(gen):
    x = randn(gen, 3, 5, 256)
    q, s = K.quantize_per_group(x, 64)
    q_rows, s_rows = K.quantize_per_token(x.reshape(-1, 64))
    assert s.shape == (3, 5, 4)
    assert torch.equal(q.reshape(-1, 64), q_rows) and torch.equal(s.reshape(-1), s_rows)


def test_quantizers_match_core_quant(gen):
    from qdoctor.quant.fp8 import quantize_fp8
    from qdoctor.quant.int8 import quantize_int8
    from qdoctor.quant.scales import scale_from_absmax

    x = randn(gen, 8, 128, scale=3.0)
    q, s = K.quantize_per_token(x)
    s_core = scale_from_absmax(x.abs().amax(dim=-1, keepdim=True), 127.0)
    assert torch.equal(s, s_core.squeeze(1)) and torch.equal(q, quantize_int8(x, s_core))
    qf, sf = K.quantize_per_token_fp8(x)
    sf_core = scale_from_absmax(x.abs().amax(dim=-1, keepdim=True), 448.0)
    assert torch.equal(sf, sf_core.squeeze(1))
    assert torch.equal(qf.view(torch.uint8), quantize_fp8(x, sf_core).view(torch.uint8))


def test_weight_quantizers(gen):
    w = randn(gen, 48, 256, scale=0.02)
    q, s = K.quantize_weight_int8(w)
    assert s.shape == (48,) and torch.equal(s, w.abs().amax(1) / 127)
    qg, sg = K.quantize_weight_int8(w, group_size=64)
    assert sg.shape == (48, 4) and torch.equal(sg, w.reshape(48, 4, 64).abs().amax(-1) / 127)
    qf, sf = K.quantize_weight_fp8(w)
    assert qf.dtype == torch.float8_e4m3fn and torch.equal(sf, w.abs().amax(1) / 448)
    assert float(qf.float().abs().max()) == 448.0


# ---------------------------------------------------------------- integer accumulation


@pytest.mark.parametrize("shape", [(1, 7, 32), (17, 33, 4096), (5, 3, 16384)])
def test_int8_mm_exact_against_int64(gen, shape):
    m, n, k = shape
    q_x = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    q_w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    q_x[0] = 127                      # worst case: |acc| = 127² K, far beyond fp32's 2²⁴
    q_w[0] = -127
    acc = R.reference_int8_mm(q_x, q_w)
    assert acc.dtype == torch.int32
    assert torch.equal(acc.long(), q_x.long() @ q_w.long().T)
    assert int(acc[0, 0]) == -127 * 127 * k
    assert torch.equal(K.int8_mm(q_x, q_w), acc)


# ---------------------------------------------------------------- scaled outputs


@pytest.mark.parametrize("act", ["token", "tensor"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_per_channel_linear_equals_fake_quant(gen, act, with_bias):
    x = randn(gen, 2, 9, 512)
    w = randn(gen, 96, 512, scale=0.05)
    bias = randn(gen, 96) if with_bias else None
    q_w, s_w = K.quantize_weight_int8(w)
    act_scale = float(x.abs().max()) / 127 if act == "tensor" else None
    y = K.reference_w8a8_linear(x, q_w, s_w, act=act, act_scale=act_scale, bias=bias)
    x2 = x.reshape(-1, 512)
    if act == "token":
        q_x, s_x = K.quantize_per_token(x2)
        s_col = s_x[:, None]
    else:
        q_x, s_col = K.quantize_per_tensor(x2, act_scale), torch.tensor(act_scale)
    y32 = fake_quant_linear(q_x, s_col, q_w, s_w[:, None], bias)
    assert y.shape == (2, 9, 96) and y.dtype == torch.float32
    assert rel_err(y.reshape(-1, 96), y32) < 1e-6
    torch.testing.assert_close(y.reshape(-1, 96), y32, rtol=1e-5, atol=1e-5 * float(y32.abs().max()))
    # The low-level GEMM computes the same exact formula.
    y_gemm = K.int8_gemm(q_x, s_col.reshape(-1) if act == "token" else torch.tensor([act_scale]), q_w, s_w,
                         bias=bias, out_dtype=torch.float32)
    assert torch.equal(y_gemm, y.reshape(-1, 96))


@pytest.mark.parametrize("act", ["token", "group"])
def test_per_group_linear_equals_fake_quant(gen, act):
    g = 64
    x = randn(gen, 13, 512)
    x[:, 5] *= 40.0  # an outlier channel: per-group scales differ strongly between groups
    w = randn(gen, 80, 512, scale=0.05)
    q_w, s_w = K.quantize_weight_int8(w, group_size=g)
    y = K.reference_w8a8_linear(x, q_w, s_w, act=act, group_size=g)
    s_w_full = s_w.repeat_interleave(g, dim=1)
    if act == "token":
        q_x, s_x = K.quantize_per_token(x)
        s_x_full = s_x[:, None]
    else:
        q_x, s_x = K.quantize_per_group(x, g)
        s_x_full = s_x.repeat_interleave(g, dim=1)
    y32 = fake_quant_linear(q_x, s_x_full, q_w, s_w_full)
    assert rel_err(y, y32) < 1e-6
    torch.testing.assert_close(y, y32, rtol=1e-5, atol=1e-5 * float(y32.abs().max()))
    assert torch.equal(K.int8_gemm_grouped(q_x, s_x, q_w, s_w, g, out_dtype=torch.float32), y)


def test_single_token_with_a_scalar_scale(gen):
    q_x = torch.randint(-127, 128, (1, 64), generator=gen, dtype=torch.int8)
    q_w = torch.randint(-127, 128, (8, 64), generator=gen, dtype=torch.int8)
    s_w = torch.rand(8, generator=gen)
    as_scalar = K.int8_gemm(q_x, torch.tensor(0.25), q_w, s_w, out_dtype=torch.float32)
    as_token = K.int8_gemm(q_x, torch.tensor([0.25]), q_w, s_w, out_dtype=torch.float32)
    assert torch.equal(as_scalar, as_token)
    assert torch.equal(as_scalar, (q_x.double() @ q_w.double().T * 0.25 * s_w.double()).float())


def test_one_group_equals_per_channel(gen):
    x = randn(gen, 11, 256)
    w = randn(gen, 40, 256, scale=0.1)
    q_w, s_w = K.quantize_weight_int8(w)
    per_channel = K.reference_w8a8_linear(x, q_w, s_w)
    one_group = K.reference_w8a8_linear(x, q_w, s_w[:, None], group_size=256)
    one_group_act = K.reference_w8a8_linear(x, q_w, s_w[:, None], group_size=256, act="group")
    torch.testing.assert_close(one_group, per_channel, rtol=2**-23, atol=0)
    torch.testing.assert_close(one_group_act, per_channel, rtol=2**-23, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_output_is_rounded_once_to_x_dtype(gen, dtype):
    x = randn(gen, 7, 128)
    w = randn(gen, 24, 128, scale=0.1)
    q_w, s_w = K.quantize_weight_int8(w)
    exact = K.reference_w8a8_linear(x.to(dtype).double(), q_w, s_w)  # same codes: x.to(dtype) is exact in float64
    y = K.w8a8_linear(x.to(dtype), q_w, s_w)
    assert y.dtype == dtype
    assert torch.equal(y, exact.to(dtype))


def test_fp8_linear_equals_fake_quant(gen):
    x = randn(gen, 10, 256)
    w = randn(gen, 64, 256, scale=0.05)
    bias = randn(gen, 64)
    q_w, s_w = K.quantize_weight_fp8(w)
    y = K.fp8_linear(x, q_w, s_w, bias=bias)
    assert torch.equal(y, K.reference_fp8_linear(x, q_w, s_w, bias=bias))
    q_x, s_x = K.quantize_per_token_fp8(x)
    y32 = fake_quant_linear(q_x, s_x[:, None], q_w, s_w[:, None], bias)
    assert rel_err(y, y32) < 1e-6
    # and it is a decent approximation of the unquantized layer
    assert rel_err(y, x @ w.T + bias) < 0.05


def test_cpu_public_api_is_the_reference(gen):
    x = randn(gen, 3, 4, 256).bfloat16()
    w = randn(gen, 32, 256, scale=0.1)
    q_w, s_w = K.quantize_weight_int8(w)
    q_wg, s_wg = K.quantize_weight_int8(w, group_size=128)
    assert torch.equal(K.w8a8_linear(x, q_w, s_w), K.reference_w8a8_linear(x, q_w, s_w))
    assert torch.equal(K.w8a8_linear(x, q_wg, s_wg, group_size=128, act="group"),
                       K.reference_w8a8_linear(x, q_wg, s_wg, group_size=128, act="group"))
    assert torch.equal(K.w8a8_linear(x, q_w, s_w, act="tensor", act_scale=0.05),
                       K.reference_w8a8_linear(x, q_w, s_w, act="tensor", act_scale=0.05))


def test_quantization_error_is_small(gen):
    x = randn(gen, 32, 1024)
    w = randn(gen, 256, 1024, scale=0.02)
    exact = x @ w.T
    per_channel = K.w8a8_linear(x, *K.quantize_weight_int8(w))
    per_group = K.w8a8_linear(x, *K.quantize_weight_int8(w, group_size=128), group_size=128)
    assert rel_err(per_channel, exact) < 0.02
    assert rel_err(per_group, exact) < rel_err(per_channel, exact)


# ---------------------------------------------------------------- errors


def test_clear_errors(gen):
    x = randn(gen, 4, 96)
    q_w, s_w = K.quantize_weight_int8(randn(gen, 8, 96))
    with pytest.raises(QDoctorError, match="does not divide"):
        K.w8a8_linear(x, q_w, torch.ones(8, 2), group_size=64)
    with pytest.raises(QDoctorError, match="act_scale"):
        K.w8a8_linear(x, q_w, s_w, act="tensor")
    with pytest.raises(QDoctorError, match="group_size"):
        K.w8a8_linear(x, q_w, s_w, act="group")
    with pytest.raises(QDoctorError, match="int8"):
        K.w8a8_linear(x, q_w.float(), s_w)
    with pytest.raises(QDoctorError, match="K ="):
        K.w8a8_linear(x[:, :64], q_w, s_w)
    with pytest.raises(QDoctorError, match="act must be"):
        K.w8a8_linear(x, q_w, s_w, act="channel")


def test_impl_is_checked_everywhere(gen):
    """A bad ``impl`` is refused on CPU too (not silently ignored by the reference path);
    "ws" (warp-specialized) exists for per-group weights only and falls back to the
    reference on CPU like every other impl."""
    x = randn(gen, 4, 256)
    q_w, s_w = K.quantize_weight_int8(randn(gen, 8, 256))
    q_wg, s_wg = K.quantize_weight_int8(randn(gen, 8, 256), group_size=128)
    q_x, s_x = K.quantize_per_token(x)
    with pytest.raises(QDoctorError, match="impl must be one of"):
        K.w8a8_linear(x, q_w, s_w, impl="cutlass")
    with pytest.raises(QDoctorError, match="impl must be one of"):
        K.int8_gemm_grouped(q_x, s_x, q_wg, s_wg, 128, impl="cutlass")
    with pytest.raises(QDoctorError, match="per-group weights only"):
        K.int8_gemm(q_x, s_x, q_w, s_w, impl="ws")
    with pytest.raises(QDoctorError, match="per-group weights only"):
        K.int8_mm(q_x, q_w, impl="ws")
    assert torch.equal(K.w8a8_linear(x, q_wg, s_wg, group_size=128, impl="ws"),
                       K.reference_w8a8_linear(x, q_wg, s_wg, group_size=128))
