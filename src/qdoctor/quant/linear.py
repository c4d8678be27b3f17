"""``QuantLinear``: a numerically faithful simulation of a W8A8 linear layer.

    y = x̂ ŵᵀ + b,   ŵ = D(Q(W)),   x̂ = D(Q(x))  (or x cast to bf16/fp16 for kept layers)

The original weight stays as ``weight`` (for export, transforms and restore); the
dequantized weight ŵ is cached in fp32 so the forward costs one extra elementwise pass
over x. Kept layers (``keep: bf16|fp16``) round x and W to that dtype, accumulate in fp32
and round the output to that dtype, as a half-precision GEMM does.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qdoctor.quant.fake import compute_scale, fake_quantize
from qdoctor.quant.scales import check_finite
from qdoctor.quant.spec import LayerScheme

_KEEP_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class QuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear, scheme: LayerScheme, act_scale: torch.Tensor | None = None, name: str = ""):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.scheme = scheme
        self.name = name
        self.weight = linear.weight
        self.bias = linear.bias
        w = self.weight.detach()
        if scheme.is_quantized:
            check_finite(w, f"weight of {name or 'layer'}")
            self.register_buffer("weight_scale", compute_scale(w, scheme.weights), persistent=False)
            w_hat = fake_quantize(w, scheme.weights, self.weight_scale)
        else:
            self.weight_scale = None
            w_hat = w.to(_KEEP_DTYPE[scheme.keep]).float()
        self.register_buffer("weight_hat", w_hat, persistent=False)
        if act_scale is not None:
            act_scale = torch.as_tensor(act_scale, dtype=torch.float32)
        self.register_buffer("input_scale", act_scale, persistent=False)
        if scheme.needs_calibration and act_scale is None:
            from qdoctor.errors import QDoctorError

            raise QDoctorError(f"{name}: static activation quantization needs a calibrated scale")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = x.dtype
        bias = self.bias.float() if self.bias is not None else None
        s = self.scheme
        if s.keep:
            kd = _KEEP_DTYPE[s.keep]
            y = F.linear(x.to(kd).float(), self.weight_hat, bias)
            return y.to(kd).to(out_dtype)
        x_hat = x.float() if s.activations is None else fake_quantize(x, s.activations, self.input_scale)
        return F.linear(x_hat, self.weight_hat, bias).to(out_dtype)

    def to_linear(self) -> nn.Linear:
        """The original full-precision layer (undo the quantization)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        lin.weight = self.weight
        if self.bias is not None:
            lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.scheme.describe()}"
