"""Quantization formats (INT8, FP8), granularities, specs, QuantLinear and apply."""
from qdoctor.quant.apply import QuantizeResult, quantize, restore
from qdoctor.quant.fake import compute_scale, fake_quantize
from qdoctor.quant.granularity import PerChannel, PerGroup, PerTensor, PerToken
from qdoctor.quant.linear import QuantLinear
from qdoctor.quant.spec import NAMED_SCHEMES, LayerScheme, QuantSpec, Scheme, get_scheme

__all__ = ["quantize", "restore", "QuantizeResult", "compute_scale", "fake_quantize", "PerChannel", "PerGroup",
           "PerTensor", "PerToken", "QuantLinear", "NAMED_SCHEMES", "LayerScheme", "QuantSpec", "Scheme", "get_scheme"]
