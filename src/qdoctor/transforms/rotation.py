"""Fixed Hadamard rotations (QuaRot, Ashkboos et al. 2024; SpinQuant, Liu et al. 2024, without
learning): orthogonal changes of basis that spread outlier channels over all channels, folded
into the weights so the full-precision function is unchanged.

For an orthogonal R (Rᵀ R = I, ``transforms.hadamard``) and a linear y = x Wᵀ:

    y = (x R)(W R)ᵀ                      input side:  W ← W R
    y R = x (Rᵀ W)ᵀ,   b ← b R           output side: W ← Rᵀ W

- **R1** (residual stream, size hidden): every block reads the stream through an RMSNorm
  x̂ ⊙ g (x̂ = x / rms(x), rotation invariant: rms(x R) = rms(x)). Fold g into the linears that
  read it (W ← W diag(g), g ← 1; Gemma's (1 + w): w ← 0), then rotate their inputs (q/k/v,
  gate/up, Mixtral's router and experts: W ← W R); rotate the outputs of the writers (o_proj,
  down_proj: W ← Rᵀ W, bias too), the embeddings (E ← E R; Gemma's √hidden scale is a scalar)
  and, after folding the final norm, the LM head (W ← W diag(g) R). A tied LM head is untied:
  it gets its own folded, rotated weight (``tie_word_embeddings = False``).
  Refused for Gemma 2 / Gemma 3: their post-attention / post-feedforward RMSNorms scale the
  *block outputs* per channel right before the residual add; diag(g) does not commute with R
  and no linear follows to absorb it (x̂ diag(g) R ≠ x̂ R diag(g)), so the stream cannot be
  rotated offline there.
- **R2** (per head, size head_dim): v_proj's output rows of every KV head W_v[h] ← R₂ᵀ W_v[h]
  (bias too) and o_proj's input columns of every query head W_o[:, h] ← W_o[:, h] R₂. The
  attention output of a head is a convex mixture of its value rows, so it comes out rotated by R₂,
  which o_proj undoes; under GQA every query head of a group reads the same rotated KV head, and
  R₂ is the same for all heads.
- **R4** (online, size intermediate): down_proj W ← W R₄ offline and x ← x R₄ on its input at
  run time (``quant.linear.set_input_transform``), before activation quantization. R₄ is the
  block-diagonal Sylvester I ⊗ H_b/√b (b the largest power of two dividing intermediate; 1536 →
  3 blocks of 512), because that is the matrix compressed-tensors' ``hadamard`` transform (with
  ``head_dim = b``) and vLLM's Hadacore kernel apply: an online transform must be the runtime's
  own matrix. Refused for Mixtral (its experts are fused 3-D parameters, not a down_proj linear).

R1's embeddings / final norm / LM head live outside the decoder blocks: ``rotate_rest`` does them
once per model (reversibly: ``RestSnapshot``), and ``rotate_block`` does a block's part as the
pipeline opens it (``Recipe.apply_block``: rotation → smoothing → rounding → quantize).

Cost: R1 and R2 are free at inference (different weights); R4 costs one Hadamard transform of
down_proj's input per token (O(n log n) with a fast kernel).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from qdoctor.errors import QDoctorError
from qdoctor.models.registry import ATTN_O, ArchSpec, arch_for
from qdoctor.models.streaming import each_block
from qdoctor.quant.linear import set_input_transform
from qdoctor.transforms.hadamard import HadamardRotation, block_rotation, rotation_for

R1_REFUSED = {
    "gemma2": "Gemma 2's post-attention/post-feedforward RMSNorms scale the block outputs per channel before "
              "the residual add; that scale does not commute with a rotation and no linear follows to absorb it",
    "gemma3": "Gemma 3's post-attention/post-feedforward RMSNorms scale the block outputs per channel before "
              "the residual add; that scale does not commute with a rotation and no linear follows to absorb it",
}
R4_REFUSED = {
    "mixtral": "Mixtral's experts are fused 3-D parameters, not a down_proj linear an online transform can precede",
}


@dataclass(frozen=True)
class ResidualLayout:
    """Who reads and writes the residual stream inside a block (block-relative parameter names):
    ``readers`` norm → parameters of shape (…, hidden) reading its output (inputs on the last
    axis); ``writers`` parameters of shape (…, hidden, in) adding to the stream."""

    readers: dict[str, tuple[str, ...]]
    writers: tuple[str, ...]


_LAYOUTS = {  # families whose layout is not the llama-like default (``residual_layout``)
    "mixtral": ResidualLayout(
        readers={"input_layernorm": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
                 "post_attention_layernorm": ("mlp.gate.weight", "mlp.experts.gate_up_proj")},
        writers=(f"{ATTN_O}.weight", "mlp.experts.down_proj")),
}


def residual_layout(arch: ArchSpec) -> ResidualLayout:
    """The family's ``ResidualLayout``: the registry's, else the norm pairs' consumers and o/down."""
    if arch.family in _LAYOUTS:
        return _LAYOUTS[arch.family]
    readers = {p.producer: tuple(c + ".weight" for c in p.consumers) for p in arch.pairs if p.kind == "norm"}
    return ResidualLayout(readers=readers, writers=(f"{ATTN_O}.weight", "mlp.down_proj.weight"))


@dataclass(frozen=True)
class RotationStep:
    """Which Hadamard rotations a plan applies (a recipe's ``rotation:`` entry).

        rotation: {r1: true, r2: true, r4: false}
    """

    r1: bool = True
    r2: bool = True
    r4: bool = False

    def __post_init__(self):
        for k in ("r1", "r2", "r4"):
            if not isinstance(getattr(self, k), bool):
                raise QDoctorError(f"rotation {k} must be true or false, got {getattr(self, k)!r}")

    @property
    def active(self) -> bool:
        return self.r1 or self.r2 or self.r4

    @property
    def basis(self) -> str:
        """The name of the basis activations are in after this step ("" for none): calibration
        statistics recorded in another basis do not describe the rotated model."""
        parts = [k for k in ("r1", "r2", "r4") if getattr(self, k)]
        return "hadamard:" + "+".join(parts) if parts else ""

    @property
    def online(self) -> tuple[str, ...]:
        """The layers (block-relative) that need an online transform at inference."""
        return ("mlp.down_proj",) if self.r4 else ()

    def to_dict(self) -> dict:
        return {"r1": self.r1, "r2": self.r2, "r4": self.r4}

    @classmethod
    def from_dict(cls, d) -> "RotationStep":
        if not isinstance(d, dict):
            raise QDoctorError("rotation is a mapping like {r1: true, r2: true, r4: false}")
        unknown = set(d) - {"r1", "r2", "r4"}
        if unknown:
            raise QDoctorError(f"unknown key(s) in rotation: {', '.join(sorted(unknown))}")
        return cls(**{k: d.get(k, getattr(cls, k)) for k in ("r1", "r2", "r4")})

    def check(self, arch: ArchSpec) -> None:
        """Refuse, in one line, a rotation the family cannot take."""
        if self.r1 and arch.family in R1_REFUSED:
            raise QDoctorError(f"rotation r1 is not available for {arch.family}: {R1_REFUSED[arch.family]}")
        if self.r4 and arch.family in R4_REFUSED:
            raise QDoctorError(f"rotation r4 is not available for {arch.family}: {R4_REFUSED[arch.family]}")


# --- the math (float64) --------------------------------------------------------------------------

def rotate_input(w: torch.Tensor, rot: HadamardRotation) -> torch.Tensor:
    """W R: the weight of a layer whose input (last axis) is rotated by R."""
    return rot.apply(w.double())


def rotate_output(w: torch.Tensor, rot: HadamardRotation) -> torch.Tensor:
    """Rᵀ W over the output axis (−2): the weight of a layer whose output is rotated by R."""
    return rot.apply(w.double().transpose(-1, -2)).transpose(-1, -2)


def rotate_vector(b: torch.Tensor, rot: HadamardRotation) -> torch.Tensor:
    """b R: a bias (or any row vector) in the rotated basis."""
    return rot.apply(b.double())


def _write(p: torch.Tensor, value: torch.Tensor) -> None:
    p.copy_(value.to(p.dtype))


CHUNK = 4096  # rows (or columns) rotated at a time: float64 temporaries stay small for 128k-row embeddings


def _rotate_inputs_(p: torch.Tensor, rot: HadamardRotation, g: torch.Tensor | None = None) -> None:
    """p ← (p diag(g)) R in place over the last axis, CHUNK rows at a time (rows are independent)."""
    flat = p.view(-1, p.shape[-1])
    for s in range(0, flat.shape[0], CHUNK):
        rows = flat[s:s + CHUNK].double()
        _write(flat[s:s + CHUNK], rotate_input(rows * g if g is not None else rows, rot))


def _rotate_outputs_(p: torch.Tensor, rot: HadamardRotation) -> None:
    """p ← Rᵀ p in place over axis −2, CHUNK columns at a time (columns are independent)."""
    for s in range(0, p.shape[-1], CHUNK):
        _write(p[..., s:s + CHUNK], rotate_output(p[..., s:s + CHUNK], rot))


def head_dim_of(config) -> int:
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else config.hidden_size // config.num_attention_heads


# --- per block --------------------------------------------------------------------------------------

@torch.no_grad()
def rotate_block(config, arch: ArchSpec, block: nn.Module, step: RotationStep) -> None:
    """The block's part of ``step`` (module docstring), in place: R1's norm folding and
    reader/writer rotations, R2 on v/o, R4's offline half and online transform on down_proj."""
    step.check(arch)
    if step.r1:
        rot = rotation_for(config.hidden_size)
        layout = residual_layout(arch)
        for norm_name, readers in layout.readers.items():
            norm = block.get_submodule(norm_name).weight
            g = arch.norm_offset + norm.double()
            for r in readers:
                _rotate_inputs_(block.get_parameter(r), rot, g)
            norm.fill_(1.0 - arch.norm_offset)
        for wname in layout.writers:
            _rotate_outputs_(block.get_parameter(wname), rot)
            bias = getattr(block.get_submodule(wname.rpartition(".")[0]), "bias", None) \
                if wname.endswith(".weight") else None
            if bias is not None:
                _write(bias, rotate_vector(bias, rot))
    if step.r2:
        rotate_heads(config, block)
    if step.r4:
        down = block.get_submodule("mlp.down_proj")
        rot4 = block_rotation(down.in_features)
        _rotate_inputs_(down.weight, rot4)
        set_input_transform(down, rot4)


def rotate_heads(config, block: nn.Module) -> None:
    """R2: v_proj's rows per KV head W_v[h] ← R₂ᵀ W_v[h] (bias b_v[h] ← b_v[h] R₂), o_proj's columns
    per query head W_o[:, h] ← W_o[:, h] R₂."""
    hd = head_dim_of(config)
    rot = rotation_for(hd)
    v, o = block.get_submodule("self_attn.v_proj"), block.get_submodule(ATTN_O)
    if v.out_features % hd or o.in_features % hd:
        raise QDoctorError(f"head_dim {hd} does not divide v_proj ({v.out_features}) / o_proj ({o.in_features})")
    wv = v.weight.view(v.out_features // hd, hd, v.in_features)
    _write(v.weight, rotate_output(wv, rot).reshape(v.weight.shape))
    if v.bias is not None:
        _write(v.bias, rotate_vector(v.bias.view(-1, hd), rot).reshape(-1))
    wo = o.weight.view(o.out_features, o.in_features // hd, hd)
    _write(o.weight, rotate_input(wo, rot).reshape(o.weight.shape))


# --- outside the blocks (R1) ------------------------------------------------------------------------

def _final_norm(model: nn.Module, arch: ArchSpec) -> nn.Module:
    return model.get_submodule(arch.blocks.rpartition(".")[0]).norm


def _tie_configs(config):
    return [c for c in (config, getattr(config, "text_config", None)) if c is not None and
            hasattr(c, "tie_word_embeddings")]


@dataclass
class RestSnapshot:
    """What ``rotate_rest`` changes (embeddings, final norm, LM head, the tie), to put it back."""

    embed: torch.Tensor
    norm: torch.Tensor
    head: torch.Tensor | None  # None: the head was tied to the embeddings
    tie: list[bool] = field(default_factory=list)

    @classmethod
    def of(cls, model: nn.Module) -> "RestSnapshot":
        arch = arch_for(model)
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        return cls(embed=emb.detach().clone(), norm=_final_norm(model, arch).weight.detach().clone(),
                   head=None if head is emb else head.detach().clone(),
                   tie=[c.tie_word_embeddings for c in _tie_configs(model.config)])

    @torch.no_grad()
    def put_back(self, model: nn.Module) -> None:
        arch = arch_for(model)
        emb_mod, head_mod = model.get_input_embeddings(), model.get_output_embeddings()
        emb_mod.weight.copy_(self.embed)
        _final_norm(model, arch).weight.copy_(self.norm)
        if self.head is None:
            head_mod.weight = emb_mod.weight
        else:
            head_mod.weight.copy_(self.head)
        for c, t in zip(_tie_configs(model.config), self.tie):
            c.tie_word_embeddings = t


@torch.no_grad()
def rotate_rest(model: nn.Module, step: RotationStep) -> list[str]:
    """R1 outside the blocks, in place: E ← E R, the final norm folded into the LM head and the
    head rotated (W ← W diag(g) R, g ← 1); a tied head is untied. Returns notes for the user."""
    arch = arch_for(model)
    step.check(arch)
    if not step.r1:
        return []
    rot = rotation_for(model.config.hidden_size)
    emb_mod, head_mod = model.get_input_embeddings(), model.get_output_embeddings()
    norm = _final_norm(model, arch).weight
    g = arch.norm_offset + norm.double()
    notes = []
    if head_mod.weight is emb_mod.weight:
        head_mod.weight = nn.Parameter(emb_mod.weight.detach().clone(), requires_grad=False)
        for c in _tie_configs(model.config):
            c.tie_word_embeddings = False
        notes.append("rotation r1 untied the LM head from the embeddings (tie_word_embeddings=false): "
                     "the head holds the final norm folded in")
    _rotate_inputs_(head_mod.weight, rot, g)
    _rotate_inputs_(emb_mod.weight, rot)
    norm.fill_(1.0 - arch.norm_offset)
    return notes


@contextmanager
def rotated_rest(model: nn.Module, step: "RotationStep | None"):
    """The model's non-block part rotated (``rotate_rest``) while the ``with`` lasts, as it was after."""
    if step is None or not step.r1:
        if step is not None:
            step.check(arch_for(model))
        yield []
        return
    snap = RestSnapshot.of(model)
    try:
        yield rotate_rest(model, step)
    finally:
        snap.put_back(model)


@torch.no_grad()
def rotate_model(model: nn.Module, step: RotationStep) -> list[str]:
    """``step`` on a whole model in memory, in place (every block and the rest); notes."""
    arch = arch_for(model)
    notes = rotate_rest(model, step)
    each_block(model, lambda i, block: rotate_block(model.config, arch, block, step))
    return notes

