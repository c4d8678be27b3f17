"""Export: a model and its plan → a compressed-tensors checkpoint (transformers, vLLM).

    model, tok = qdoctor.load("smollm2-135m")
    qdoctor.quantize(model, "w8a8-channel-token")
    report = qdoctor.export.export_checkpoint(model, tok, "smollm2-w8a8")

or, with the plan applied block by block as it is written (a model in memory is left as it
was; a checkpoint larger than memory, ``qdoctor.load(path, stream=True)``, takes the same path):

    report = qdoctor.export.export_checkpoint(model, tok, "out", recipe=recipe, stats=stats)

See docs/export.md for the format mapping, what loaders do with it and what cannot be expressed.
"""

from qdoctor.export.checkpoint import ExportReport, export_checkpoint, planned_layers
from qdoctor.export.ctconfig import ExportGroup, ExportPlan, plan_export, quantization_args, vllm_issue

__all__ = ["export_checkpoint", "ExportReport", "planned_layers", "plan_export", "ExportPlan", "ExportGroup",
           "quantization_args", "vllm_issue"]
