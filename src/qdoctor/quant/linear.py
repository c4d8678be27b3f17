"""``QuantLinear``: a numerically faithful simulation of a W8A8 linear layer.

    y = x̂ ŵᵀ + b,   ŵ = D(Q(W)),   x̂ = D(Q(x))  (or x cast to bf16/fp16 for kept layers)

The original weight stays as ``weight`` (for export, transforms and restore); the
dequantized weight ŵ is cached in fp32 so the forward costs one extra elementwise pass
over x. Kept layers (``keep: bf16|fp16``) round x and W to that dtype, accumulate in fp32
and round the output to that dtype, as a half-precision GEMM does.

On CUDA, when ``qdoctor.kernels`` has Triton, the layers that real kernels can run (INT8
per-channel / per-tensor / per-group weights and FP8 per-channel / per-tensor weights, with
per-token dynamic or per-tensor static activations) run them instead of the simulation:
same formula, integer (or FP8) tensor-core GEMM with fused dequantization. Set
``QDOCTOR_NO_KERNELS=1`` or ``QuantLinear.use_kernels = False`` to force the simulation.

An *online input transform* (``set_input_transform``: the R4 Hadamard of ``transforms.rotation``)
is applied to x before anything else — before activation quantization, as vLLM's
compressed-tensors transform linear method does: y = Q(x R) ŵᵀ + b. It is data on the layer
(an object with ``apply(x)``, e.g. a ``HadamardRotation``), carried from the ``nn.Linear`` to
its ``QuantLinear`` and back (``to_linear``); on a plain ``nn.Linear`` a forward pre-hook applies it.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from qdoctor.quant.fake import compute_scale, fake_quantize, quantize_rows
from qdoctor.quant.granularity import PerGroup, PerTensor, PerToken
from qdoctor.quant.scales import check_finite
from qdoctor.quant.spec import LayerScheme

KEEP_TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # keep: → dtype


def _apply_transform(transform, x: torch.Tensor) -> torch.Tensor:
    return transform.apply(x.float()).to(x.dtype)  # fp32 butterflies whatever the activation dtype


def apply_input_transform(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x R for a linear with an online input transform, else x (what its forward does first)."""
    transform = input_transform_of(module)
    return x if transform is None else _apply_transform(transform, x)


def input_transform_of(module: nn.Module):
    """The online input transform of a linear (None: none)."""
    return getattr(module, "qdoctor_input_transform", None)


def set_input_transform(module: nn.Module, transform) -> None:
    """Give ``module`` (an ``nn.Linear`` or a ``QuantLinear``) the online input transform x → x R."""
    clear_input_transform(module)
    module.qdoctor_input_transform = transform
    if not isinstance(module, QuantLinear):
        module.qdoctor_input_hook = module.register_forward_pre_hook(
            lambda _m, args: (_apply_transform(transform, args[0]),) + tuple(args[1:]))


def clear_input_transform(module: nn.Module) -> None:
    hook = getattr(module, "qdoctor_input_hook", None)
    if hook is not None:
        hook.remove()
    for attr in ("qdoctor_input_hook", "qdoctor_input_transform"):
        if attr in module.__dict__:
            delattr(module, attr)


def clear_input_transforms(model: nn.Module) -> int:
    """Remove every online input transform under ``model`` (undoing a rotation step); the count."""
    mods = [m for m in model.modules() if input_transform_of(m) is not None]
    for m in mods:
        clear_input_transform(m)
    return len(mods)


class QuantLinear(nn.Module):
    use_kernels: bool = os.environ.get("QDOCTOR_NO_KERNELS", "") in ("", "0")
    qdoctor_input_transform = None  # online input transform (``set_input_transform``)

    def __init__(self, linear: nn.Linear, scheme: LayerScheme, act_scale: torch.Tensor | None = None, name: str = "",
                 weight: torch.Tensor | None = None, weight_scale: torch.Tensor | None = None):
        """``weight``/``weight_scale``: a weight already on the grid and its scale (GPTQ's Ŵ, s) used
        in place of ``linear.weight`` and the scale computed from it — as given, never recomputed
        (absmax(Ŵ)/qmax is not s); ``to_linear`` still gives back ``linear`` with its own weight."""
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.scheme = scheme
        self.name = name
        self.original_weight = (linear.weight,)  # a tuple: not a second registered parameter
        if weight is not None:
            weight = nn.Parameter(weight.detach().to(linear.weight.device), requires_grad=False)
        self.weight = linear.weight if weight is None else weight
        self.bias = linear.bias
        self.qdoctor_input_transform = input_transform_of(linear)  # applied first in forward
        w = self.weight.detach()
        if scheme.is_quantized:
            check_finite(w, f"weight of {name or 'layer'}")
            scale = compute_scale(w, scheme.weights) if weight_scale is None else weight_scale.float().to(w.device)
            self.register_buffer("weight_scale", scale, persistent=False)
        else:
            self.weight_scale = None
        self.register_buffer("_weight_hat", None, persistent=False)  # see weight_hat
        if act_scale is not None:
            act_scale = torch.as_tensor(act_scale, dtype=torch.float32)
        self.register_buffer("input_scale", act_scale, persistent=False)
        if scheme.needs_calibration and act_scale is None:
            from qdoctor.errors import QDoctorError

            raise QDoctorError(f"{name}: static activation quantization needs a calibrated scale")

    @property
    def weight_hat(self) -> torch.Tensor:
        """ŵ in fp32 (``dequantized_weight``), computed on first use and cached: the kernel path
        (codes + scales, 1 byte per weight) never needs it, so on a GPU with kernels it costs no
        memory (4 bytes per weight otherwise)."""
        if self._weight_hat is None or self._weight_hat.device != self.weight.device:
            self._weight_hat = self.dequantized_weight()
        return self._weight_hat

    def dequantized_weight(self) -> torch.Tensor:
        """A fresh ŵ in fp32, not cached: the fake-quantized weight D(Q(W)), or W rounded to the
        kept dtype (for one-off uses such as the export's round-trip check)."""
        w = self.weight.detach()
        if self.scheme.is_quantized:
            return fake_quantize(w, self.scheme.weights, self.weight_scale.to(w.device))
        return w.to(KEEP_TORCH_DTYPE[self.scheme.keep]).float()

    def kernel_route(self) -> dict | None:
        """Keyword arguments for ``qdoctor.kernels`` when a real kernel implements this layer."""
        s = self.scheme
        if not s.is_quantized or s.activations is None:
            return None
        a, w = s.activations, s.weights
        if isinstance(a.granularity, PerToken) and a.dynamic:
            act = {"act": "token"}
        elif isinstance(a.granularity, PerTensor) and not a.dynamic:
            act = {"act": "tensor", "act_scale": self.input_scale}
        else:
            return None
        if isinstance(w.granularity, PerGroup):
            from qdoctor.kernels import GROUP_SIZES

            # FP8 per-group, or a group size the INT8 kernel does not tile: the simulation runs it
            if w.dtype == "fp8" or w.granularity.group_size not in GROUP_SIZES \
                    or self.in_features % w.granularity.group_size:
                return None
        return {"fp8": w.dtype == "fp8",
                "group_size": w.granularity.group_size if isinstance(w.granularity, PerGroup) else None, **act}

    def _kernel_forward(self, x: torch.Tensor, route: dict) -> torch.Tensor:
        from qdoctor import kernels

        if getattr(self, "_codes", None) is None or self._codes[0].device != x.device:
            q, scale = quantize_rows(self.weight.detach(), self.scheme.weights, self.weight_scale)
            scale = scale.reshape(scale.shape[0], -1) if route["group_size"] else scale.reshape(-1)
            if scale.numel() == 1:  # per-tensor weights: the same scale on every row
                scale = scale.expand(q.shape[0]).contiguous()
            self._codes = (q.to(x.device), scale.float().to(x.device).contiguous())
        q, scale = self._codes
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        act_scale = route.get("act_scale")
        if act_scale is not None:
            act_scale = act_scale.to(x.device)
        if route["fp8"]:
            return kernels.fp8_linear(x, q, scale, act=route["act"], act_scale=act_scale, bias=bias)
        return kernels.w8a8_linear(x, q, scale, act=route["act"], act_scale=act_scale,
                                   group_size=route["group_size"], bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = apply_input_transform(self, x)
        if x.is_cuda and self.use_kernels:
            route = self.kernel_route()
            if route is not None:
                from qdoctor.kernels import available

                if available():
                    return self._kernel_forward(x, route)
        out_dtype = x.dtype
        bias = self.bias.float() if self.bias is not None else None
        s = self.scheme
        if s.keep:
            kd = KEEP_TORCH_DTYPE[s.keep]
            y = F.linear(x.to(kd).float(), self.weight_hat, bias)
            return y.to(kd).to(out_dtype)
        x_hat = x.float() if s.activations is None else fake_quantize(x, s.activations, self.input_scale)
        return F.linear(x_hat, self.weight_hat, bias).to(out_dtype)

    def to_linear(self) -> nn.Linear:
        """The original full-precision layer (undo the quantization)."""
        weight = self.original_weight[0]
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=weight.device, dtype=weight.dtype)
        lin.weight = weight
        if self.bias is not None:
            lin.bias = self.bias
        if self.qdoctor_input_transform is not None:
            set_input_transform(lin, self.qdoctor_input_transform)
        return lin

    def extra_repr(self) -> str:
        online = ", online input transform" if self.qdoctor_input_transform is not None else ""
        return f"{self.in_features}, {self.out_features}, {self.scheme.describe()}{online}"
