"""Shared test helpers: tiny random-weight models of real configs, saved as safetensors."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 512
_TOKENIZER_CACHE: dict[str, object] = {}


def tiny_tokenizer():
    """A real byte-level BPE tokenizer trained on a slice of WikiText-2 valid (vocab 512)."""
    if "tok" not in _TOKENIZER_CACHE:
        from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
        from transformers import PreTrainedTokenizerFast

        from qdoctor.calib.text import wikitext_text

        text = wikitext_text("valid")[:200_000]
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<bos>", "<eos>", "<pad>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tk.train_from_iterator(text.split("\n"), trainer)
        _TOKENIZER_CACHE["tok"] = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                                          pad_token="<pad>")
    return _TOKENIZER_CACHE["tok"]


def tiny_config(family: str):
    import transformers as tf

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, bos_token_id=0,
                  eos_token_id=1, pad_token_id=2)
    table = {
        "llama": lambda: tf.LlamaConfig(**common),
        "llama-mha": lambda: tf.LlamaConfig(**{**common, "num_key_value_heads": 4}),
        "mistral": lambda: tf.MistralConfig(**common),
        "qwen2": lambda: tf.Qwen2Config(**common),
        "qwen3": lambda: tf.Qwen3Config(**common, head_dim=16),
        "gemma": lambda: tf.GemmaConfig(**common, head_dim=16),
        "gemma2": lambda: tf.Gemma2Config(**common, head_dim=16),
        "gemma3_text": lambda: tf.Gemma3TextConfig(**common, head_dim=16),
        "mixtral": lambda: tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2),
    }
    return table[family]()


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "mixtral"]


def tiny_model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    # Random norm weights so that norm folding is exercised (defaults are all ones / zeros).
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n and p.dim() == 1:
                p.copy_(torch.rand_like(p) * 0.5 + (0.75 if "gemma" not in family else -0.25))
    return model.eval()


def save_tiny(family: str, path: Path, seed: int = 0) -> Path:
    model = tiny_model(family, seed)
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    return path


def cli_reports_whole_and_streamed(tmp_path: Path, args: list[str], ok: tuple[int, ...] = (0,)) -> tuple[dict, dict]:
    """Run ``qdoctor <args> --json …`` on the whole model, then again with ``--stream``; the two
    JSON reports (whole, streamed). Each run must exit with a code in ``ok``."""
    import json

    from qdoctor.cli import main

    reports = []
    for mode in ("whole", "stream"):
        js = tmp_path / f"{mode}.json"
        code = main(args + ["--json", str(js)] + (["--stream"] if mode == "stream" else []))
        assert code in ok, f"{mode}: exit code {code}"
        reports.append(json.loads(js.read_text()))
    return reports[0], reports[1]
