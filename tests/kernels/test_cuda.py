"""CUDA kernels against the reference (skipped without CUDA + Triton).

Stated tolerances (docs/kernels.md):
- activation quantization: codes and scales bit-exact;
- INT8 accumulation (``int8_mm``): bit-exact int32;
- per-channel scaled output: |y − exact| ≤ u_out·|exact| + d_out + 4·2⁻²⁴·(|acc·s_x·s_w| + |b|),
  where u_out is half an ulp of the output dtype (2⁻⁸ bf16, 2⁻¹¹ fp16, 2⁻²⁴ fp32), d_out half
  its subnormal spacing, and "exact" is the formula in float64 (the fp32 epilogue does an
  int→fp32 conversion, two products, one add);
- per-group: fp32 accumulation over K/g groups: ‖y − exact‖ / ‖exact‖ ≤ 1e-5 + u_out and
  elementwise |y − exact| ≤ u_out·|exact| + 1e-5·max|exact|;
- FP8 (cuBLASLt/CUTLASS row-wise): ‖y − exact‖ / ‖exact‖ ≤ 5e-3 (bf16 output).
"""

import pytest
import torch

import qdoctor.kernels as K
from qdoctor.kernels import reference as R

pytestmark = pytest.mark.skipif(not K.available(), reason="needs a CUDA GPU and Triton")

HALF_ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
# half the spacing of the dtype's subnormals: the absolute rounding error near zero
HALF_SUBNORMAL = {torch.bfloat16: 2.0**-134, torch.float16: 2.0**-25, torch.float32: 2.0**-150}


def _impls():
    if not torch.cuda.is_available():
        return ["ptr"]
    return ["ptr", "tma"] if torch.cuda.get_device_capability()[0] >= 9 else ["ptr"]


IMPLS = _impls()


@pytest.fixture
def cuda_gen():
    return torch.Generator(device="cuda").manual_seed(4321)


def randn(gen, *shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)


def randint8(gen, *shape):
    return torch.randint(-127, 128, shape, generator=gen, device="cuda", dtype=torch.int8)


def poison(nbytes: int) -> None:
    """Fill the block the caching allocator will hand out next with NaN/garbage, so that an
    output element the kernel fails to write cannot equal the right answer by accident."""
    torch.full((nbytes // 4 + 1,), float("nan"), device="cuda")


def bits(q):
    return q.view(torch.uint8) if q.dtype == torch.float8_e4m3fn else q


# ---------------------------------------------------------------- activation quantization


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,k", [(1, 16), (37, 100), (64, 4096), (3, 10000), (5, 28672)])  # > 8192: two passes
def test_quantize_per_token_bit_exact(cuda_gen, dtype, m, k):
    x = randn(cuda_gen, m, k, scale=3.0, dtype=dtype)
    x[0, : k // 2] = 0.0
    if m > 2:
        x[2] = 0.0  # an all-zero row: scale 1, codes 0
    poison(m * k)
    q, s = K.quantize_per_token(x)
    q_ref, s_ref = R.quantize_per_token_reference(x)
    assert torch.equal(s, s_ref)
    assert torch.equal(q, q_ref)
    qf, sf = K.quantize_per_token_fp8(x)
    qf_ref, sf_ref = R.quantize_per_token_fp8_reference(x)
    assert torch.equal(sf, sf_ref)
    assert torch.equal(bits(qf), bits(qf_ref))


@pytest.mark.parametrize("fp8", [False, True])
def test_quantize_per_tensor_bit_exact(cuda_gen, fp8):
    x = randn(cuda_gen, 33, 2048, dtype=torch.bfloat16)
    scale = float(x.float().abs().max()) / (300.0 if fp8 else 80.0)  # small on purpose: saturates
    q = (K.quantize_per_tensor_fp8 if fp8 else K.quantize_per_tensor)(x, scale)
    q_ref = R.quantize_per_tensor_reference(x, scale, fp8=fp8)
    assert torch.equal(bits(q), bits(q_ref))


def test_quantize_per_group_bit_exact(cuda_gen):
    x = randn(cuda_gen, 2, 19, 1024, dtype=torch.bfloat16)
    q, s = K.quantize_per_group(x, 128)
    q_ref, s_ref = R.quantize_per_group_reference(x, 128)
    assert torch.equal(s, s_ref) and torch.equal(q, q_ref)


# ---------------------------------------------------------------- integer accumulation


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("m,n,k", [(1, 256, 512), (37, 1000, 4096), (300, 384, 2048), (700, 520, 1024)])
def test_int8_mm_bit_exact(cuda_gen, impl, m, n, k):
    q_x, q_w = randint8(cuda_gen, m, k), randint8(cuda_gen, n, k)
    poison(m * n * 4)
    acc = K.int8_mm(q_x, q_w, impl=impl)
    assert acc.dtype == torch.int32
    assert torch.equal(acc, R.reference_int8_mm(q_x, q_w))


@pytest.mark.parametrize("impl", IMPLS)
def test_int8_mm_extreme_values_bit_exact(impl):
    k = 8192  # |acc| = 127²·8192 ≈ 1.3e8 ≫ 2²⁴: any float accumulation would round
    q_x = torch.full((64, k), 127, dtype=torch.int8, device="cuda")
    q_w = torch.full((128, k), -127, dtype=torch.int8, device="cuda")
    q_w[1::2] = 127
    acc = K.int8_mm(q_x, q_w, impl=impl)
    assert torch.equal(acc, R.reference_int8_mm(q_x, q_w))
    assert int(acc[0, 0]) == -127 * 127 * k


# ---------------------------------------------------------------- scaled outputs


def assert_per_channel_close(y, q_x, s_x, q_w, s_w, bias):
    exact = R.reference_int8_gemm(q_x, s_x, q_w, s_w, bias, torch.float64)
    unbiased = R.reference_int8_gemm(q_x, s_x, q_w, s_w, None, torch.float64)
    bound = (HALF_ULP[y.dtype] * exact.abs() + HALF_SUBNORMAL[y.dtype]
             + 4 * 2.0**-24 * (unbiased.abs() + (bias.double().abs() if bias is not None else 0)))
    err = (y.double() - exact).abs()
    assert bool((err <= bound + 1e-30).all()), f"max excess {float((err - bound).max())}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("m", [3, 700])
@pytest.mark.parametrize("act,with_bias,out_dtype", [("token", False, torch.bfloat16), ("token", True, torch.float32),
                                                    ("tensor", False, torch.bfloat16), ("token", False, torch.float16)])
def test_int8_gemm_matches_reference(cuda_gen, impl, m, act, with_bias, out_dtype):
    n, k = 640, 2048
    q_x, q_w = randint8(cuda_gen, m, k), randint8(cuda_gen, n, k)
    s_x = (torch.rand(m if act == "token" else 1, generator=cuda_gen, device="cuda") + 0.1) * 0.02
    s_w = (torch.rand(n, generator=cuda_gen, device="cuda") + 0.1) * 0.002
    bias = randn(cuda_gen, n, dtype=out_dtype) if with_bias else None
    poison(m * n * 4)
    y = K.int8_gemm(q_x, s_x, q_w, s_w, bias=bias, out_dtype=out_dtype, impl=impl)
    assert y.dtype == out_dtype and y.shape == (m, n)
    assert_per_channel_close(y, q_x, s_x, q_w, s_w, bias)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("m", [5, 300, 700])
@pytest.mark.parametrize("act,out_dtype,with_bias", [("token", torch.bfloat16, False), ("group", torch.float32, True)])
def test_int8_gemm_grouped_matches_reference(cuda_gen, impl, m, act, out_dtype, with_bias):
    n, k, g = 384, 2048, 128
    q_x, q_w = randint8(cuda_gen, m, k), randint8(cuda_gen, n, k)
    s_x = (torch.rand(*((m,) if act == "token" else (m, k // g)), generator=cuda_gen, device="cuda") + 0.1) * 0.02
    # stored as the transpose of a contiguous (K/g, N) tensor: the fast layout
    s_w = ((torch.rand(k // g, n, generator=cuda_gen, device="cuda") + 0.1) * 0.002).t()
    bias = randn(cuda_gen, n) if with_bias else None
    poison(m * n * 4)
    y = K.int8_gemm_grouped(q_x, s_x, q_w, s_w, g, bias=bias, out_dtype=out_dtype, impl=impl)
    exact = R.reference_int8_gemm_grouped(q_x, s_x, q_w, s_w, g, bias, torch.float64)
    u = HALF_ULP[out_dtype]
    err = (y.double() - exact).abs()
    assert float(err.norm() / exact.norm()) <= 1e-5 + u
    assert bool((err <= u * exact.abs() + 1e-5 * exact.abs().max()).all())


HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.skipif(not HOPPER, reason="the warp-specialized per-group kernel needs sm90")
@pytest.mark.parametrize("m,n,k", [(1, 200, 256), (37, 1000, 1024), (129, 192, 128), (300, 384, 2048),
                                   (700, 520, 1280)])
@pytest.mark.parametrize("act,out_dtype,with_bias,scales_nk", [("token", torch.bfloat16, False, False),
                                                               ("tensor", torch.float32, True, False),
                                                               ("token", torch.float16, True, True)])
def test_int8_gemm_grouped_ws_matches_reference(cuda_gen, m, n, k, act, out_dtype, with_bias, scales_nk):
    """The warp-specialized Gluon kernel (impl="ws"): partial channel tiles (N not a multiple of
    192), partial token tiles, one group (K = 128), both scale layouts, bias, three output dtypes."""
    g = 128
    q_x, q_w = randint8(cuda_gen, m, k), randint8(cuda_gen, n, k)
    s_x = (torch.rand(m if act == "token" else 1, generator=cuda_gen, device="cuda") + 0.1) * 0.02
    s_w = (torch.rand(k // g, n, generator=cuda_gen, device="cuda") + 0.1) * 0.002
    s_w = s_w.t().contiguous() if scales_nk else s_w.t()
    bias = randn(cuda_gen, n, dtype=out_dtype) if with_bias else None
    poison(m * n * 4)
    y = K.int8_gemm_grouped(q_x, s_x, q_w, s_w, g, bias=bias, out_dtype=out_dtype, impl="ws")
    assert y.dtype == out_dtype and y.shape == (m, n)
    exact = R.reference_int8_gemm_grouped(q_x, s_x, q_w, s_w, g, bias, torch.float64)
    u = HALF_ULP[out_dtype]
    err = (y.double() - exact).abs()
    assert float(err.norm() / exact.norm()) <= 1e-5 + u
    assert bool((err <= u * exact.abs() + 1e-5 * exact.abs().max()).all())
    # "auto" follows the measured preference: the warp-specialized kernel or the Triton one
    from qdoctor.kernels import _gluon_group_gemm as ws

    chosen = "ws" if ws.preferred(m, n, torch.cuda.get_device_properties(0).multi_processor_count) else "tma"
    assert torch.equal(K.int8_gemm_grouped(q_x, s_x, q_w, s_w, g, bias=bias, out_dtype=out_dtype),
                       K.int8_gemm_grouped(q_x, s_x, q_w, s_w, g, bias=bias, out_dtype=out_dtype, impl=chosen))


@pytest.mark.skipif(not HOPPER, reason="the warp-specialized per-group kernel needs sm90")
def test_int8_gemm_grouped_ws_refuses_what_it_cannot_run(cuda_gen):
    from qdoctor.errors import QDoctorError

    q_x, q_w = randint8(cuda_gen, 8, 256), randint8(cuda_gen, 64, 256)
    s_x = torch.rand(8, device="cuda") + 0.1
    with pytest.raises(QDoctorError, match="group size 128"):
        K.int8_gemm_grouped(q_x, s_x, q_w, torch.rand(64, 4, device="cuda"), 64, impl="ws")
    with pytest.raises(QDoctorError, match="per-group"):
        K.int8_gemm_grouped(q_x, torch.rand(8, 2, device="cuda"), q_w, torch.rand(64, 2, device="cuda"), 128,
                            impl="ws")
    with pytest.raises(QDoctorError, match="per-group weights only"):
        K.int8_gemm(q_x, s_x, q_w, torch.rand(64, device="cuda"), impl="ws")


@pytest.mark.parametrize("act", ["token", "tensor", "group"])
def test_w8a8_linear_end_to_end(cuda_gen, act):
    x = randn(cuda_gen, 2, 150, 1024, dtype=torch.bfloat16)
    w = randn(cuda_gen, 768, 1024, scale=0.03)
    bias = randn(cuda_gen, 768, dtype=torch.bfloat16)
    g = 128 if act == "group" else None
    q_w, s_w = K.quantize_weight_int8(w, group_size=g)
    act_scale = float(x.float().abs().max()) / 127 if act == "tensor" else None
    y = K.w8a8_linear(x, q_w, s_w, act=act, act_scale=act_scale, group_size=g, bias=bias)
    ref = K.reference_w8a8_linear(x.double(), q_w, s_w, act=act, act_scale=act_scale, group_size=g, bias=bias)
    assert y.shape == (2, 150, 768) and y.dtype == torch.bfloat16
    err = (y.double() - ref).abs()
    assert bool((err <= 2.0**-8 * ref.abs() + 1e-5 * ref.abs().max()).all())
    # and close to the unquantized layer
    exact = x.double() @ w.double().T + bias.double()
    assert float((y.double() - exact).norm() / exact.norm()) < 0.03


# ---------------------------------------------------------------- FP8


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 needs sm89+")
@pytest.mark.parametrize("act,with_bias", [("token", False), ("token", True), ("tensor", False)])
def test_fp8_linear_matches_reference(cuda_gen, act, with_bias):
    x = randn(cuda_gen, 300, 1024, dtype=torch.bfloat16)
    w = randn(cuda_gen, 512, 1024, scale=0.03)
    bias = randn(cuda_gen, 512, dtype=torch.bfloat16) if with_bias else None
    q_w, s_w = K.quantize_weight_fp8(w)
    act_scale = float(x.float().abs().max()) / 448 if act == "tensor" else None
    y = K.fp8_linear(x, q_w, s_w, act=act, act_scale=act_scale, bias=bias)
    ref = K.reference_fp8_linear(x.double(), q_w, s_w, act=act, act_scale=act_scale, bias=bias)
    assert y.dtype == torch.bfloat16 and y.shape == (300, 512)
    assert float((y.double() - ref).norm() / ref.norm()) <= 5e-3
