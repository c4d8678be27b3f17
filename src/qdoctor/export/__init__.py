"""Export: a model quantized by qdoctor → a compressed-tensors checkpoint (transformers, vLLM).

    model, tok = qdoctor.load("smollm2-135m")
    qdoctor.quantize(model, "w8a8-channel-token")
    report = qdoctor.export.export_checkpoint(model, tok, "smollm2-w8a8")

For a checkpoint larger than memory, ``export_streamed`` treats and writes one decoder block
at a time (``qdoctor.load(path, stream=True)``). See docs/export.md for the format mapping, what loaders do with it and what cannot be expressed.
"""

from qdoctor.export.checkpoint import ExportReport, export_checkpoint, layer_plan, plan_for_model
from qdoctor.export.ctconfig import ExportGroup, ExportPlan, plan_export, quantization_args, vllm_issue
from qdoctor.export.streamed import export_streamed

__all__ = ["export_checkpoint", "export_streamed", "ExportReport", "plan_for_model", "layer_plan", "plan_export", "ExportPlan",
           "ExportGroup", "quantization_args", "vllm_issue"]
