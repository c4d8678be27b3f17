"""Tokenize (context, continuation) pairs exactly as lm-eval's ``HFLM`` does for causal models.

lm-eval 0.4.x, ``TemplateLM._encode_pair`` and ``HFLM.tok_encode``:

- trailing whitespace of the context moves to the front of the continuation;
- ``whole = encode(context + continuation)``, ``context_enc = encode(context)``,
  ``continuation_enc = whole[len(context_enc):]`` (so a merge across the boundary is scored
  the way lm-eval scores it);
- ``encode`` uses the tokenizer's own special-token behaviour unless ``add_bos_token`` is
  given, and adds none when the text already starts with the BOS string;
- an empty context becomes ``[prefix_token_id]`` (BOS, else EOS) — or, when the continuation
  already starts with that token, its first token.

One addition, off unless asked: ``force_bos`` prepends BOS when the tokenizer does not, for
architectures that are unusable without it (Gemma from GGUF; see ``bos_policy``).
"""

from __future__ import annotations

from dataclasses import dataclass


def resolve_max_length(model, tokenizer, default: int = 2048) -> int:
    """lm-eval's rule: the model config's context length, else the tokenizer's, else 2048."""
    config = getattr(model, "config", None)
    for cfg in (getattr(config, "text_config", None), config):
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(cfg, attr, None) if cfg is not None else None
            if isinstance(value, int) and value > 0:
                return value
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000_000:  # transformers' "unset" is ~1e30
        return tok_max
    return default


def bos_policy(model, tokenizer) -> bool:
    """True when the architecture registry says the model needs <bos> and the tokenizer does not add it."""
    try:
        from qdoctor.models.registry import arch_for

        needs = arch_for(model).needs_bos
    except Exception:  # not a registered architecture: behave exactly like lm-eval
        return False
    bos = tokenizer.bos_token_id
    if not needs or bos is None:
        return False
    ids = tokenizer.encode("a")
    return not ids or ids[0] != bos


@dataclass
class PairEncoder:
    tokenizer: object
    add_bos_token: bool | None = None  # lm-eval HFLM's model_arg of the same name
    prefix_token_id: int | None = None  # lm-eval HFLM's model_arg; default BOS, else EOS
    force_bos: bool = False

    def __post_init__(self):
        tok = self.tokenizer
        if self.prefix_token_id is None:
            self.prefix_token_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self._bos_text = tok.decode(self.prefix_token_id) if self.prefix_token_id is not None else None
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        kwargs = {}
        if add_special_tokens is not None:
            kwargs["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            kwargs["add_special_tokens"] = self.add_bos_token
        if add_special_tokens is None and self._bos_text is not None and text.startswith(self._bos_text):
            kwargs["add_special_tokens"] = False
        ids = list(self.tokenizer.encode(text, **kwargs))
        if self.force_bos and kwargs.get("add_special_tokens", True):
            bos = self.tokenizer.bos_token_id
            if not ids or ids[0] != bos:
                ids = [bos] + ids
        return ids

    def _encode_cached(self, text: str) -> list[int]:
        # The contexts of one item repeat for every choice; encode each once.
        ids = self._cache.get(text)
        if ids is None:
            if len(self._cache) > 4096:
                self._cache.clear()
            ids = self._cache[text] = self.encode(text)
        return ids

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            cont = self.encode(continuation, add_special_tokens=False)
            if not cont:
                raise ValueError("empty context and empty continuation")
            if cont[0] != self.prefix_token_id:
                return [self.prefix_token_id], cont
            return cont[:1], cont[1:]
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        context_enc = self._encode_cached(context)
        return context_enc, whole[len(context_enc):]
