"""Shared pieces of the robustness tests (issue 18): a copy of the tiny model per test, a
snapshot of directories (to prove nothing was written), and the "one line, exit 2" check."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

# Small everything: the tests below are about refusals, not numbers.
EVAL_SMALL = ["--seqlen", "32", "--limit", "1", "--calib-samples", "2", "--calib-seqlen", "16"]
CALIB_SMALL = ["--calib-samples", "2", "--calib-seqlen", "16"]


@pytest.fixture
def model_copy(tiny_llama_dir, tmp_path):
    """A private copy of the session's tiny Llama directory (tests corrupt it)."""
    def make(name: str = "m") -> Path:
        d = tmp_path / name
        shutil.copytree(tiny_llama_dir, d)
        return d
    return make


def snapshot(*roots: Path) -> dict:
    """Every file under ``roots`` with its size and mtime (dot-files included)."""
    out = {}
    for root in roots:
        if root.is_file():
            st = root.stat()
            out[str(root)] = (st.st_size, st.st_mtime_ns)
            continue
        for p in sorted(root.rglob("*")):
            st = p.lstat()
            out[str(p)] = (st.st_size if p.is_file() else -1, st.st_mtime_ns if p.is_file() else 0)
    return out


def refused(argv: list[str], needle: str, capsys, watch: list[Path] = ()) -> str:
    """Run ``qdoctor argv`` in-process: exit 2, exactly one ``qdoctor: error:`` line that contains
    ``needle``, no traceback, and nothing under ``watch`` created or changed. Returns the line."""
    from qdoctor.cli import main

    capsys.readouterr()
    before = snapshot(*watch)
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("qdoctor: error:")]
    assert code == 2, err
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err
    assert snapshot(*watch) == before, "something was written"
    return lines[0]


def st_header(path: Path) -> tuple[int, dict]:
    """(header length, header) of a safetensors file."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8:8 + n])


def write_tiny_llama_gguf(path: Path, chat_template: str | None = None, name: str | None = None) -> Path:
    """The tiny random Llama (tests/helpers.py) as a complete GGUF file (f32 tensors, the tiny
    BPE tokenizer as a gpt2-style vocabulary), loadable by transformers."""
    import gguf

    from helpers import tiny_model, tiny_tokenizer

    m, tok = tiny_model("llama"), tiny_tokenizer()
    c = m.config
    w = gguf.GGUFWriter(str(path), "llama")
    if name is not None:
        w.add_name(name)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(c.vocab_size)
    tj = json.loads(tok.backend_tokenizer.to_str())
    vocab = tj["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges([mg if isinstance(mg, str) else " ".join(mg) for mg in tj["model"]["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_pad_token_id(2)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        for hf, gg in names.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", sd[f"model.layers.{i}.{hf}.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
