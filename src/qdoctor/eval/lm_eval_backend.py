"""lm-evaluation-harness model type ``qdoctor``: lm-eval's ``hf`` model (HFLM) over a model that
qdoctor loaded and, optionally, quantized — so any lm-eval task can check a plan.

lm-eval 0.4.13 has no plugin discovery (no entry-point group; ``--include_path`` only adds task
YAMLs), so the name exists once this module is imported. Three ways in:

    # 1. lm-eval's own CLI, behind a one-line wrapper that registers the model first
    python -m qdoctor.eval.lm_eval_backend --model qdoctor \\
        --model_args pretrained=smollm2-135m,recipe=plan.yaml --tasks piqa --limit 100
    qdoctor-lm-eval ...            # same, once the console script is installed

    # 2. Python, by name
    import lm_eval, qdoctor.eval.lm_eval_backend  # registers "qdoctor"
    lm_eval.simple_evaluate(model="qdoctor", model_args={"pretrained": "smollm2-135m",
                            "scheme": "w8a8-channel-token"}, tasks=["piqa"])

    # 3. Python, a model already in memory (quantized or not)
    lm = QDoctorLM(pretrained=model, tokenizer=tok)
    lm_eval.simple_evaluate(model=lm, tasks=[...])

model_args: ``pretrained`` (anything ``qdoctor.load`` accepts, or a model object with
``tokenizer=``), ``recipe`` (a qdoctor or llm-compressor recipe file: calibrate, smooth, quantize) or ``scheme``
(a named scheme or a scheme file; calibrated on WikiText-2 when static), ``dtype`` (fp32, bf16,
fp16), ``device``; everything else goes to HFLM (``batch_size``, ``max_length``, ``add_bos_token``...).
For architectures that need <bos> when the tokenizer does not add it (Gemma from GGUF),
contexts get BOS, as in ``qdoctor.eval.zeroshot``.
"""

from __future__ import annotations

from pathlib import Path

import lm_eval.models  # noqa: F401  lm-eval's own models first: get_model() imports them only into an empty registry
import torch
from lm_eval.api.registry import model_registry
from lm_eval.models.huggingface import HFLM

from qdoctor.errors import QDoctorError
from qdoctor.eval.zeroshot.encoding import bos_policy

MODEL_NAME = "qdoctor"


def apply_plan(model, tokenizer, recipe: str | None = None, scheme: str | None = None):
    """Quantize ``model`` in place per a recipe file or a scheme (name or file); None if neither."""
    if recipe and scheme:
        raise QDoctorError("give recipe= or scheme=, not both")
    if recipe:
        import sys

        from qdoctor.policy.recipe import read_recipe

        plan, notes = read_recipe(recipe)  # a qdoctor or an llm-compressor recipe
        for note in notes:
            print(f"qdoctor: {recipe}: note: {note}", file=sys.stderr)
        return plan.apply(model, tokenizer)
    if scheme:
        from qdoctor.api import calibrate, quantize
        from qdoctor.quant.schemefile import load_scheme_file
        from qdoctor.quant.spec import get_scheme

        resolved = load_scheme_file(scheme) if Path(scheme).is_file() else get_scheme(scheme)
        stats = calibrate(model, tokenizer) if resolved.needs_calibration else None
        return quantize(model, resolved, calibration=stats)
    return None


def _device_or_default(device: str | None) -> str | None:
    # lm-eval's CLI passes device="cuda:0" by default; HFLM falls back to CPU without CUDA.
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        return None
    return device


class QDoctorLM(HFLM):
    def __init__(self, pretrained, tokenizer=None, recipe: str | None = None, scheme: str | None = None,
                 dtype: str | None = None, device: str | None = None, **kwargs):
        if isinstance(pretrained, str):
            from qdoctor.models.loading import load

            model, loaded_tok = load(pretrained, dtype=dtype, device=_device_or_default(device))
            if isinstance(tokenizer, str):
                raise QDoctorError("tokenizer= by name is not supported; qdoctor loads the model's own tokenizer")
            tokenizer = tokenizer or loaded_tok
        else:
            if tokenizer is None:
                raise QDoctorError("a model object needs its tokenizer: QDoctorLM(pretrained=model, tokenizer=tok)")
            model = pretrained
        self.quantize_result = apply_plan(model, tokenizer, recipe=recipe, scheme=scheme)
        self.recipe, self.scheme = recipe, scheme
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)
        self._force_bos = bos_policy(model, tokenizer)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        context_enc, continuation_enc = super()._encode_pair(context, continuation)
        bos = self.tokenizer.bos_token_id
        if self._force_bos and (not context_enc or context_enc[0] != bos):
            context_enc = [bos] + context_enc
        return context_enc, continuation_enc

    def tok_batch_encode(self, strings: list[str], *args, **kwargs):
        if self._force_bos:
            bos = self.tokenizer.bos_token
            strings = [s if s.startswith(bos) else bos + s for s in strings]
        return super().tok_batch_encode(strings, *args, **kwargs)

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info.update(qdoctor_source=getattr(self.model, "qdoctor_source", None), qdoctor_recipe=self.recipe,
                    qdoctor_scheme=self.scheme)
        return info


def register() -> None:
    """Make ``--model qdoctor`` resolvable (idempotent; a lazy placeholder until first use)."""
    if MODEL_NAME not in model_registry:
        # By import path, so running this file as __main__ still resolves to the importable class.
        model_registry.register(MODEL_NAME, target="qdoctor.eval.lm_eval_backend:QDoctorLM")


register()


def main() -> None:
    """lm-eval's CLI with the ``qdoctor`` model type registered (all lm-eval arguments apply)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
