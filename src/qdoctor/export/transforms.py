"""Online transforms (the R4 Hadamard of ``transforms.rotation``) as compressed-tensors writes them.

Offline rotations (R1, R2, R4's weight half) are already in the exported weights. What is left
for the runtime is x ← x R₄ on down_proj's input, written as a ``transform_config`` inside the
``quantization_config``:

    {"config_groups": {"R4": {"type": "hadamard", "head_dim": b, "apply": [
        {"targets": ["model.layers.0.mlp.down_proj", …], "location": "input"}]}}}

- ``type: hadamard`` is compressed-tensors' deterministic Sylvester matrix
  (``deterministic_hadamard_matrix``) and vLLM's Hadacore kernel; with ``head_dim = b`` both apply
  it block-diagonally, I ⊗ H_b / √b — exactly ``transforms.hadamard.block_rotation``, so the
  runtime multiplies by the same matrix qdoctor simulated (a ``random-hadamard`` would be drawn
  from a seeded generator at load time, and a Paley ⊗ Sylvester matrix has no such type).
- Only the online ``input`` location is listed: the ``weight_input`` (inverse) half is fused into
  the stored weights already, and ``compressed_tensors.transform.apply_transform_config`` would
  fuse it a second time (vLLM reads online locations only).
- Each transformed layer also carries ``<layer>.R4_input.weight`` (the unnormalized ±1 H_b),
  the parameter vLLM's ``HadamardTransform`` loads (and divides by √b) and compressed-tensors
  registers under the same name.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from qdoctor.quant.linear import input_transform_of
from qdoctor.transforms.hadamard import HadamardRotation, sylvester

SCHEME_NAME = "R4"


def online_transforms(module: nn.Module, prefix: str = "") -> dict[str, HadamardRotation]:
    """Full layer name → its online input transform, for every layer under ``module`` that has one."""
    return {prefix + n: t for n, m in module.named_modules() if (t := input_transform_of(m)) is not None}


def transform_tensors(online: dict[str, HadamardRotation], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``<layer>.R4_input.weight``: the unnormalized Sylvester H_b of each layer's transform."""
    return {f"{name}.{SCHEME_NAME}_input.weight": sylvester(t.block).to(dtype) for name, t in online.items()}


def transform_config(online: dict[str, HadamardRotation]):
    """The compressed-tensors ``TransformConfig`` of the online transforms (None when there are none)."""
    if not online:
        return None
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme

    blocks = {t.block for t in online.values()}
    if len(blocks) != 1 or not all(t.block_diagonal or t.factor == 1 for t in online.values()):
        raise ValueError("online transforms must be Sylvester blocks of one size")  # rotation.py builds one
    return TransformConfig(config_groups={SCHEME_NAME: TransformScheme(
        type="hadamard", head_dim=blocks.pop(),
        apply=[TransformArgs(targets=sorted(online), location="input")])})
