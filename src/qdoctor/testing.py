"""Test fixtures for users and for qdoctor's own tests: planted weight outliers, saving a model.

    from qdoctor.testing import plant_weight_outliers, save_model
    result = plant_weight_outliers(model, blocks=(0, 1, 2), dims=3, magnitude=100)  # function-preserving
    save_model(model, tokenizer, "planted/", metadata={"planted": result.layers})
    qdoctor.load("planted/")

``plant_weight_outliers`` reproduces Llama-3-70B's weight signature (Qin 2024: |W| > 90 on a few
input dims of the first blocks' q/k/v/gate/up) in any supported model without changing its
full-precision function, so a scan's weight-outlier detection can be checked against a known
answer (``precision_recall``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from qdoctor.errors import QDoctorError
from qdoctor.transforms.plant import PROJECTIONS, PlantResult, plant_weight_outliers

__all__ = ["plant_weight_outliers", "PlantResult", "PROJECTIONS", "save_model", "precision_recall",
           "PLANT_METADATA"]

PLANT_METADATA = "qdoctor_plant.json"


def precision_recall(flagged, truth) -> tuple[float, float]:
    """(precision, recall) of the ``flagged`` layer names against the ``truth`` names
    (1.0 for an empty flagged / truth set that matches)."""
    flagged, truth = set(flagged), set(truth)
    hit = len(flagged & truth)
    precision = hit / len(flagged) if flagged else (1.0 if not truth else 0.0)
    recall = hit / len(truth) if truth else 1.0
    return precision, recall


def _rebuilt(model):
    """A plain transformers model of the same class and config holding the same weights.

    A GGUF-loaded model cannot ``save_pretrained`` directly (its config and loading state carry the
    GGUF origin); rebuilding the class from the config and loading the state dict gives one that can.
    """
    from transformers import AutoModelForCausalLM

    dtype = next(model.parameters()).dtype
    config = model.config
    fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = model.state_dict()
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    tied = set(getattr(fresh, "_tied_weights_keys", None) or [])
    if isinstance(getattr(fresh, "_tied_weights_keys", None), dict):
        tied = set(fresh._tied_weights_keys)
    real_missing = [k for k in missing if k not in tied and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if real_missing or unexpected:
        raise QDoctorError(f"could not rebuild {type(model).__name__} from its config: missing {real_missing[:5]}, "
                           f"unexpected {list(unexpected)[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    return fresh.eval()


def save_model(model, tokenizer, out_dir: str, overwrite: bool = False, metadata: dict | None = None) -> Path:
    """Save ``model`` + ``tokenizer`` as a Hugging Face safetensors directory, atomically: written
    into a temporary directory beside ``out_dir``, then renamed. An existing ``out_dir`` is
    refused unless ``overwrite``. ``metadata`` (JSON-able) goes to ``qdoctor_plant.json``."""
    out = Path(out_dir).expanduser()
    if out.exists() and not overwrite:
        raise QDoctorError(f"{out_dir}: already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise QDoctorError(f"{out_dir}: exists and is not a directory")
    if not out.parent.exists():
        raise QDoctorError(f"{out_dir}: parent directory {out.parent} does not exist")
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        with torch.no_grad():
            _rebuilt(model).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if metadata is not None:
            (tmp / PLANT_METADATA).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.rmdir(old)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
