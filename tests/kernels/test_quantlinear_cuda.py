"""QuantLinear on CUDA runs the kernels; they must agree with the CPU simulation."""

import pytest
import torch
import torch.nn as nn

from qdoctor.quant import LayerScheme, PerChannel, PerGroup, PerTensor, PerToken, QuantLinear, QuantSpec

CASES = {
    "int8-channel-token": LayerScheme(QuantSpec("int8", PerChannel()), QuantSpec("int8", PerToken(), dynamic=True)),
    "int8-tensor-static": LayerScheme(QuantSpec("int8", PerTensor()), QuantSpec("int8", PerTensor())),
    "int8-group64-token": LayerScheme(QuantSpec("int8", PerGroup(64)), QuantSpec("int8", PerToken(), dynamic=True)),
    "fp8-channel-token": LayerScheme(QuantSpec("fp8", PerChannel()), QuantSpec("fp8", PerToken(), dynamic=True)),
    "fp8-channel-static": LayerScheme(QuantSpec("fp8", PerChannel()), QuantSpec("fp8", PerTensor())),
}


def test_kernel_route_on_cpu_is_described_but_simulation_runs():
    lin = nn.Linear(128, 64)
    q = QuantLinear(lin, CASES["int8-group64-token"])
    assert q.kernel_route() == {"fp8": False, "group_size": 64, "act": "token"}
    assert QuantLinear(lin, LayerScheme(keep="bf16")).kernel_route() is None
    assert QuantLinear(lin, LayerScheme(QuantSpec("int8", PerChannel()),
                                        QuantSpec("int8", PerTensor(), dynamic=True))).kernel_route() is None
    # group sizes the Triton GEMM does not tile (16) stay on the simulation
    token = QuantSpec("int8", PerToken(), dynamic=True)
    assert QuantLinear(lin, LayerScheme(QuantSpec("int8", PerGroup(16)), token)).kernel_route() is None
    assert QuantLinear(nn.Linear(96, 8), LayerScheme(QuantSpec("int8", PerGroup(32)), token)).kernel_route() is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(CASES))
def test_kernels_match_simulation(name):
    from qdoctor.kernels import available

    if not available():
        pytest.skip("Triton kernels unavailable")
    torch.manual_seed(0)
    lin = nn.Linear(512, 256).cuda()
    x = torch.randn(4, 33, 512, device="cuda")
    ls = CASES[name]
    scale = torch.tensor(float(x.abs().max()) / ls.activations.qmax) if ls.needs_calibration else None
    q = QuantLinear(lin, ls, act_scale=scale)
    QuantLinear.use_kernels = False
    with torch.no_grad():
        sim = q(x)
    QuantLinear.use_kernels = True
    with torch.no_grad():
        got = q(x)
    rel = float((got - sim).norm() / sim.norm())
    assert rel < (2e-2 if ls.weights.dtype == "fp8" else 1e-4), rel
