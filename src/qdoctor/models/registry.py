"""Architecture registry: one declarative entry per model family.

Each ``ArchSpec`` names, relative to one decoder block, the linear layers and the
producer→consumer pairs that smoothing transforms fold scales through:

- norm → linears: an RMSNorm whose output feeds those linears (input norm → q/k/v,
  MLP norm → gate/up). Scaling channel j of the norm's output by 1/S_j is done by
  dividing its weight — for Gemma's ``(1 + w)`` RMSNorm by rewriting w so that
  1 + w' = (1 + w) / S_j (``norm_offset = 1``).
- linear → linear: v→o (only when every attention head has its own value head, i.e.
  num_heads == num_kv_heads, so a per-channel scale on o's input maps one-to-one onto
  v's output rows) and up→down (down's input is act(gate) · up, linear in up's rows).

Add a family by adding an entry; nothing else branches on ``model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qdoctor.errors import QDoctorError

ATTN_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
ATTN_O = "self_attn.o_proj"
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class SmoothPair:
    """``producer`` (a norm or a linear, block-relative) feeds every module in ``consumers``.

    ``condition``: ``"always"`` or ``"same_heads"`` (only when num_heads == num_kv_heads).
    """

    producer: str
    consumers: tuple[str, ...]
    kind: str  # "norm" | "linear"
    condition: str = "always"


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    blocks: str  # dotted path of the ModuleList of decoder blocks
    linears: tuple[str, ...]  # block-relative names of every quantizable nn.Linear
    pairs: tuple[SmoothPair, ...]
    norm_offset: float = 0.0  # RMSNorm computes x̂ · (norm_offset + w)
    needs_bos: bool = False  # the model needs <bos> at the start of every sequence
    notes: str = ""
    unsupported: tuple[str, ...] = field(default_factory=tuple)  # block-relative params not quantized, with reason in notes

    def pairs_for(self, config) -> tuple[SmoothPair, ...]:
        """The pairs valid for this model's config (drops v→o under grouped-query attention)."""
        return tuple(p for p in self.pairs if pair_applies(p, config))

    def input_groups(self, config) -> list[tuple[str, ...]]:
        """The block's linears grouped by shared input: the consumers of one norm (q/k/v, gate/up)
        see the same tensor, so its statistics are recorded once; every other linear is its own
        group. The first name of a group is the one that records."""
        groups, seen = [], set()
        for pair in self.pairs_for(config):
            if pair.kind == "norm":
                members = tuple(c for c in pair.consumers if c in self.linears and c not in seen)
                if members:
                    groups.append(members)
                    seen.update(members)
        return groups + [(rel,) for rel in self.linears if rel not in seen]


def pair_applies(pair: SmoothPair, config) -> bool:
    if pair.condition == "always":
        return True
    if pair.condition == "same_heads":
        heads = getattr(config, "num_attention_heads", None)
        kv = getattr(config, "num_key_value_heads", None) or heads
        return heads is not None and heads == kv
    raise QDoctorError(f"unknown smoothing-pair condition {pair.condition!r}")


def _llama_like(family: str, model_types: tuple[str, ...], mlp_norm: str = "post_attention_layernorm",
                norm_offset: float = 0.0, needs_bos: bool = False, notes: str = "") -> ArchSpec:
    return ArchSpec(
        family=family,
        model_types=model_types,
        blocks="model.layers",
        linears=ATTN_QKV + (ATTN_O,) + MLP,
        pairs=(
            SmoothPair("input_layernorm", ATTN_QKV, "norm"),
            SmoothPair(mlp_norm, ("mlp.gate_proj", "mlp.up_proj"), "norm"),
            SmoothPair("self_attn.v_proj", (ATTN_O,), "linear", condition="same_heads"),
            SmoothPair("mlp.up_proj", ("mlp.down_proj",), "linear"),
        ),
        norm_offset=norm_offset,
        needs_bos=needs_bos,
        notes=notes,
    )


ARCHITECTURES: tuple[ArchSpec, ...] = (
    _llama_like("llama", ("llama",)),
    _llama_like("mistral", ("mistral",)),
    _llama_like("qwen2", ("qwen2",)),
    _llama_like("qwen3", ("qwen3",), notes="q_norm/k_norm act on q/k outputs, after the projections"),
    _llama_like("gemma", ("gemma",), norm_offset=1.0, needs_bos=True, notes="RMSNorm uses (1 + w)"),
    _llama_like("gemma2", ("gemma2",), mlp_norm="pre_feedforward_layernorm", norm_offset=1.0, needs_bos=True,
                notes="RMSNorm uses (1 + w); post_attention_layernorm normalises the attention output"),
    _llama_like("gemma3", ("gemma3_text", "gemma3"), mlp_norm="pre_feedforward_layernorm", norm_offset=1.0,
                needs_bos=True, notes="RMSNorm uses (1 + w); text decoder of Gemma 3"),
    ArchSpec(
        family="mixtral",
        model_types=("mixtral",),
        blocks="model.layers",
        linears=ATTN_QKV + (ATTN_O,),
        pairs=(
            SmoothPair("input_layernorm", ATTN_QKV, "norm"),
            SmoothPair("self_attn.v_proj", (ATTN_O,), "linear", condition="same_heads"),
        ),
        notes=("experts are fused 3-D parameters (mlp.experts.gate_up_proj / down_proj) in transformers 5, "
               "not nn.Linear; they and the router stay in full precision"),
        unsupported=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    ),
)

_BY_MODEL_TYPE = {mt: a for a in ARCHITECTURES for mt in a.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def arch_for_model_type(model_type: str) -> ArchSpec:
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise QDoctorError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(supported_model_types())}"
        ) from None


def arch_for(model) -> ArchSpec:
    """The ``ArchSpec`` of a loaded transformers model."""
    return arch_for_model_type(getattr(model.config, "model_type", "<unknown>"))


def get_blocks(model, arch: ArchSpec | None = None):
    """The ModuleList of decoder blocks."""
    arch = arch or arch_for(model)
    mod = model
    for part in arch.blocks.split("."):
        mod = getattr(mod, part)
    return mod


def block_linear_names(model, arch: ArchSpec | None = None) -> list[str]:
    """Full module names of every quantizable linear, in block order."""
    arch = arch or arch_for(model)
    n = len(get_blocks(model, arch))
    return [f"{arch.blocks}.{i}.{rel}" for i in range(n) for rel in arch.linears]


def bos_token_id(model, tokenizer) -> int | None:
    """The token every sequence starts with: <bos> for families that need it (``needs_bos``:
    Gemma), else None (the text starts the window). The one place this rule is stated."""
    arch = arch_for(model)
    if not arch.needs_bos:
        return None
    if getattr(tokenizer, "bos_token_id", None) is None:
        raise QDoctorError(f"{arch.family} needs <bos> but the tokenizer has no bos_token_id")
    return tokenizer.bos_token_id
