"""A second derivation of what the loaders compute, for the round-trip tests.

``loader_semantics(model)`` makes qdoctor's ``QuantLinear`` layers compute what
transformers + compressed-tensors compute for the exported checkpoint (read from
compressed_tensors/quantization/lifecycle/forward.py and utils/helpers.py, 0.20):

- weights: the stored codes × scales — exactly qdoctor's ŵ (checked by the exporter);
- dynamic INT8 activations: s = absmax / 127.5 (the symmetric range (127 − (−128)) / 2),
  q = clamp(round(x / s), −128, 127) — qdoctor and vLLM use s = absmax / 127, q ∈ [−127, 127];
- static INT8 activations: the stored s, q = clamp(round(x / s), −128, 127);
- FP8 activations: s = absmax / 448 (dynamic) or the stored s, q = e4m3(clamp(x / s, ±448)) — as qdoctor;
- kept layers: plain fp32 matmul with the stored (bf16/fp16-valued) weight: loaders run every
  unquantized layer in the checkpoint dtype, without qdoctor's rounding of x and y.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from qdoctor.quant.granularity import PerGroup, PerTensor
from qdoctor.quant.linear import QuantLinear


def ct_fake_quantize_input(x: torch.Tensor, spec, input_scale: torch.Tensor | None) -> torch.Tensor:
    xf = x.float()
    g = spec.granularity
    if isinstance(g, PerGroup):
        xf = xf.unflatten(-1, (xf.shape[-1] // g.group_size, g.group_size))
    if spec.dynamic:
        if isinstance(g, PerTensor):
            amax = xf.abs().amax()
        else:  # per token, or per group (last dim of the group view)
            amax = xf.abs().amax(dim=-1, keepdim=True)
        half_range = 127.5 if spec.dtype == "int8" else 448.0
        s = amax / half_range
        s = torch.where(s == 0, torch.full_like(s, torch.finfo(torch.float32).eps), s)
    else:
        s = input_scale.float()
    if spec.dtype == "int8":
        q = torch.round(torch.clamp(xf / s, -128, 127))
    else:
        q = torch.clamp(xf / s, -448, 448).to(torch.float8_e4m3fn).float()
    return (q * s).reshape(x.shape)


def _loader_forward(layer: QuantLinear):
    bias = layer.bias.float() if layer.bias is not None else None
    s = layer.scheme

    def forward(x):
        t = layer.qdoctor_input_transform  # an online rotation runs before the layer (vLLM, compressed-tensors)
        if t is not None:
            x = t.apply(x.float()).to(x.dtype)
        if s.keep:
            return F.linear(x.float(), layer.weight_hat, bias).to(x.dtype)
        xh = x.float() if s.activations is None else ct_fake_quantize_input(x, s.activations, layer.input_scale)
        return F.linear(xh, layer.weight_hat, bias).to(x.dtype)

    return forward


@contextmanager
def loader_semantics(model):
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        m.forward = _loader_forward(m)
    try:
        yield model
    finally:
        for m in layers:
            del m.forward


@contextmanager
def weights_only(model):
    """qdoctor's layers with activation quantization switched off (ŵ only)."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]

    def fwd(layer):
        bias = layer.bias.float() if layer.bias is not None else None
        return lambda x: F.linear(x.float(), layer.weight_hat, bias).to(x.dtype)

    for m in layers:
        m.forward = fwd(m)
    try:
        yield model
    finally:
        for m in layers:
            del m.forward


def read_tensors(out_dir) -> dict:
    """Every tensor of a checkpoint directory (all shards)."""
    from pathlib import Path

    from safetensors import safe_open

    tensors = {}
    for f in sorted(Path(out_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            tensors.update({k: h.get_tensor(k) for k in h.keys()})
    return tensors


def assert_stored_as_qdoctor(model, tensors) -> int:
    """The checkpoint holds qdoctor's codes, scales and kept weights bit for bit; returns the
    number of quantized layers checked."""
    from qdoctor.quant.fake import quantize as qd_quantize

    checked = 0
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        if m.scheme.keep:
            kd = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[m.scheme.keep]
            assert tensors[f"{name}.weight"].dtype == kd, name
            assert torch.equal(tensors[f"{name}.weight"], m.weight.detach().to(kd)), name
            continue
        codes, scale = qd_quantize(m.weight.detach(), m.scheme.weights, m.weight_scale)
        assert tensors[f"{name}.weight_scale"].dtype == torch.float32, name
        assert torch.equal(tensors[f"{name}.weight_scale"].reshape(scale.shape), scale), name
        if m.scheme.activations is None:  # pack-quantized: int8 codes packed 4 per int32
            from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

            shape = torch.Size(tensors[f"{name}.weight_shape"].tolist())
            assert torch.equal(unpack_from_int32(tensors[f"{name}.weight_packed"], 8, shape).to(torch.int8), codes), name
        else:
            stored = tensors[f"{name}.weight"]
            assert stored.dtype == codes.dtype, name
            assert torch.equal(stored.view(torch.uint8), codes.view(torch.uint8)), name
        if m.input_scale is not None:
            assert torch.equal(tensors[f"{name}.input_scale"], m.input_scale.reshape(1)), name
        else:
            assert f"{name}.input_scale" not in tensors, name
        checked += 1
    return checked
