"""Plant Llama-3-70B-like weight outliers into a real model, function-preserving.

Llama-3/3.1-70B holds |W| > 90 on a few input dimensions of the first blocks' q/k/v/gate/up
(Qin 2024). Small real models don't. ``plant_weight_outliers`` reproduces the signature by
folding S_j = c_j through the norm → {q,k,v} and norm → {gate,up} pairs: the norm weight
on dimension j is divided by c_j and the consumers' column j multiplied by c_j, so the
full-precision function is unchanged while max|W[:, j]| reaches ``magnitude``.

c_j = magnitude / min over the pair's consumers of max_n |W[n, j]|: every consumer of the
norm is scaled (that is what folding through a shared norm means), and each one's column j
reaches at least ``magnitude``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qdoctor.errors import QDoctorError
from qdoctor.models.registry import arch_for, get_blocks
from qdoctor.transforms.fold import fold_scales, pair_for_consumer

PROJECTIONS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj"}


@dataclass
class PlantResult:
    dims: dict[int, list[int]]  # block → planted input dims (shared by every consumer of the norm)
    layers: list[str] = field(default_factory=list)  # full names of every layer that now holds outliers
    magnitude: float = 0.0


def _resolve_projection(p: str) -> str:
    return PROJECTIONS.get(p, p)


@torch.no_grad()
def plant_weight_outliers(model, blocks=(0, 1, 2), projections=("q", "k", "v", "gate", "up"),
                          dims: "int | list[int]" = 3, magnitude: float = 100.0, seed: int = 0) -> PlantResult:
    """Plant outliers of ``magnitude`` on ``dims`` input dimensions (a count → chosen at random
    with ``seed``, or explicit indices) of the given blocks' projections. In place."""
    if magnitude <= 0:
        raise QDoctorError("magnitude must be positive")
    arch = arch_for(model)
    all_blocks = get_blocks(model, arch)
    rels = [_resolve_projection(p) for p in projections]
    pairs = {}
    for rel in rels:
        pair = pair_for_consumer(arch, model.config, rel)
        if pair is None or pair.kind != "norm":
            raise QDoctorError(f"cannot plant into {rel}: it is not fed by a norm in {arch.family}")
        pairs[pair.producer] = pair
    hidden = model.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    result = PlantResult(dims={}, magnitude=magnitude)
    for b in blocks:
        if not 0 <= b < len(all_blocks):
            raise QDoctorError(f"block {b} out of range (model has {len(all_blocks)})")
        if isinstance(dims, int):
            chosen = sorted(torch.randperm(hidden, generator=g)[:dims].tolist())
        else:
            chosen = sorted(int(d) for d in dims)
            if any(not 0 <= d < hidden for d in chosen):
                raise QDoctorError(f"dims must lie in [0, {hidden})")
        result.dims[b] = chosen
        block = all_blocks[b]
        for pair in pairs.values():
            colmax = torch.stack([block.get_submodule(c).weight.detach().abs().double().amax(0)
                                  for c in pair.consumers]).amin(0).cpu()  # the weights may be on a GPU
            s = torch.ones(hidden, dtype=torch.float64)
            idx = torch.tensor(chosen)
            s[idx] = magnitude / colmax[idx].clamp_min(1e-12)  # S_j = c_j: columns × c_j, norm ÷ c_j
            fold_scales(block, arch, pair, s)
            result.layers += [f"{arch.blocks}.{b}.{c}" for c in pair.consumers]
    return result
