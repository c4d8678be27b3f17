"""QuantLinear against an integer GEMM written directly (int64 accumulation, then rescale)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qdoctor.errors import QDoctorError
from qdoctor.quant import LayerScheme, PerChannel, PerGroup, PerTensor, PerToken, QuantLinear, QuantSpec
from qdoctor.quant.fake import quantize


def _lin(k=64, n=32, bias=True):
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight[:, 5] *= 30  # an outlier input dimension
    return lin


def test_int8_per_token_per_channel_equals_integer_gemm():
    lin = _lin()
    x = torch.randn(3, 7, 64)
    ls = LayerScheme(QuantSpec("int8", PerChannel()), QuantSpec("int8", PerToken(), dynamic=True))
    y = QuantLinear(lin, ls)(x)
    qx, sx = quantize(x, ls.activations)
    qw, sw = quantize(lin.weight.detach(), ls.weights)
    acc = torch.einsum("btk,nk->btn", qx.long(), qw.long())  # exact int64 accumulation
    ref = acc.double() * sx.double() * sw.double().T + lin.bias.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_per_group_weights_equal_groupwise_integer_sums():
    lin = _lin(bias=False)
    x = torch.randn(5, 64)
    ls = LayerScheme(QuantSpec("int8", PerGroup(16)), QuantSpec("int8", PerToken(), dynamic=True))
    y = QuantLinear(lin, ls)(x)
    qx, sx = quantize(x, ls.activations)
    qw, sw = quantize(lin.weight.detach(), ls.weights)  # sw: (N, K/g)
    ref = torch.zeros(5, 32, dtype=torch.float64)
    for g in range(4):
        part = qx[:, g * 16:(g + 1) * 16].long() @ qw[:, g * 16:(g + 1) * 16].long().T
        ref += part.double() * sw[:, g].double()
    ref *= sx.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_static_activation_scale_is_used():
    lin = _lin()
    ls = LayerScheme(QuantSpec("int8", PerTensor()), QuantSpec("int8", PerTensor(), dynamic=False))
    x = torch.randn(4, 64)
    scale = torch.tensor(0.5 / 127)  # calibrated absmax 0.5: larger inputs saturate
    y = QuantLinear(lin, ls, act_scale=scale)(x)
    w_hat = quantize(lin.weight.detach(), ls.weights)
    w_ref = w_hat[0].float() * w_hat[1]
    x_ref = torch.clamp(torch.round(x / scale), -127, 127) * scale
    torch.testing.assert_close(y, F.linear(x_ref, w_ref, lin.bias), rtol=1e-5, atol=1e-5)
    with pytest.raises(QDoctorError, match="calibrated"):
        QuantLinear(lin, ls)


def test_keep_bf16_rounds_like_a_bf16_gemm_and_restore_is_exact():
    lin = _lin()
    x = torch.randn(4, 64)
    q = QuantLinear(lin, LayerScheme(keep="bf16"))
    y = q(x)
    ref = F.linear(x.bfloat16(), lin.weight.bfloat16(), lin.bias.bfloat16()).float()
    torch.testing.assert_close(y, ref, rtol=2 ** -7, atol=1e-2)
    assert torch.equal(q.to_linear()(x), lin(x))


def test_fp8_linear_matches_dequantized_product():
    lin = _lin()
    x = torch.randn(6, 64)
    ls = LayerScheme(QuantSpec("fp8", PerChannel()), QuantSpec("fp8", PerToken(), dynamic=True))
    qx, sx = quantize(x, ls.activations)
    qw, sw = quantize(lin.weight.detach(), ls.weights)
    ref = (qx.double() @ qw.double().T) * sx.double() * sw.double().T + lin.bias.double()
    torch.testing.assert_close(QuantLinear(lin, ls)(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_weight_hat_is_built_on_first_use_and_equals_codes_times_scales():
    """ŵ (4 bytes per weight) is not materialized by the constructor — the GPU kernel path runs
    from int8 codes and never needs it — and, once asked for, is D(Q(W)) from integer codes."""
    lin = _lin()
    ls = LayerScheme(QuantSpec("int8", PerChannel()), QuantSpec("int8", PerToken(), dynamic=True))
    ql = QuantLinear(lin, ls)
    assert ql._weight_hat is None
    qw, sw = quantize(lin.weight.detach(), ls.weights)
    torch.testing.assert_close(ql.weight_hat, qw.double().mul(sw.double()).float(), rtol=0, atol=0)
    assert ql.weight_hat is ql.weight_hat  # cached
    kept = QuantLinear(lin, LayerScheme(None, None, keep="bf16"))
    assert torch.equal(kept.weight_hat, lin.weight.detach().bfloat16().float())


@pytest.mark.parametrize("gran", [PerTensor(), PerChannel(), PerGroup(16)])
@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_quantize_rows_equals_quantize(gran, dtype):
    """Row blocks (here 3 rows = 192 elements at a time, not dividing 32 rows) give the codes and
    scales of one whole-tensor call."""
    from qdoctor.quant.fake import compute_scale, quantize_rows

    w = _lin(k=64, n=32).weight.detach()
    spec = QuantSpec(dtype, gran)
    scale = compute_scale(w, spec)
    q_ref, s_ref = quantize(w, spec, scale)
    q, s = quantize_rows(w, spec, scale, max_elems=3 * 64)
    assert torch.equal(q.view(torch.uint8) if dtype == "fp8" else q, q_ref.view(torch.uint8) if dtype == "fp8" else q_ref)
    assert torch.equal(s, s_ref)
