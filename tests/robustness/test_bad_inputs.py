"""Bad inputs (issue 18, item 1): each class answered with one line and exit 2 — no traceback,
nothing written. docs/robustness.md tabulates class → message → test."""

from __future__ import annotations

import errno
import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from .conftest import CALIB_SMALL, EVAL_SMALL, refused, st_header

EVAL = ["eval", "--scheme", "w8a8-channel-token", *EVAL_SMALL[:4]]  # a dynamic scheme takes no --calib-*
STATIC = ["eval", "--scheme", "w8a8-channel-tensor-static", *EVAL_SMALL]


# --- safetensors ---------------------------------------------------------------------------------

def test_truncated_safetensors_data(model_copy, capsys):
    m = model_copy()
    f = m / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    refused([*EVAL, "--model", m], "truncated safetensors file", capsys, [m])


def test_truncated_safetensors_streamed(model_copy, capsys, tmp_path):
    m = model_copy()
    f = m / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    refused(["scan", "--stream", "--quiet", *CALIB_SMALL, "--model", m, "--json", tmp_path / "s.json"],
            "truncated safetensors file", capsys, [m, tmp_path])


def test_corrupted_safetensors_header(model_copy, capsys):
    m = model_copy()
    f = m / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:40] = b"#" * 32  # the JSON header
    f.write_bytes(bytes(raw))
    refused([*EVAL, "--model", m], "corrupted safetensors header", capsys, [m])


def test_safetensors_header_length_past_end(model_copy, capsys):
    m = model_copy()
    f = m / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 10**12) + f.read_bytes()[8:])
    refused([*EVAL, "--model", m], "header length 1000000000000 bytes", capsys, [m])


def test_safetensors_without_header(model_copy, capsys):
    m = model_copy()
    (m / "model.safetensors").write_bytes(b"\x01\x02\x03")
    refused(["scan", "--stream", "--quiet", *CALIB_SMALL, "--model", m], "not even a header length", capsys, [m])


def test_safetensors_offsets_do_not_fit(model_copy, capsys):
    m = model_copy()
    f = m / "model.safetensors"
    raw = f.read_bytes()
    n, header = st_header(f)
    name = "model.layers.0.self_attn.q_proj.weight"
    a, b = header[name]["data_offsets"]
    header[name]["data_offsets"] = [a, b - 4]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text))
    f.write_bytes(raw[:8] + text + raw[8 + n:])
    refused([*EVAL, "--model", m], f"tensor {name!r}: offsets", capsys, [m])


def _poison(f: Path, tensor: str, value: bytes) -> None:
    """Overwrite the first element of ``tensor`` (fp32) in a safetensors file with ``value``."""
    n, header = st_header(f)
    a = header[tensor]["data_offsets"][0]
    raw = bytearray(f.read_bytes())
    raw[8 + n + a: 8 + n + a + 4] = value
    f.write_bytes(bytes(raw))


def test_corrupted_safetensors_data_nan_names_the_weight(model_copy, capsys):
    m = model_copy()
    _poison(m / "model.safetensors", "model.layers.1.mlp.down_proj.weight", b"\xff\xff\xff\xff")  # a NaN
    refused([*EVAL, "--model", m], "weight 'model.layers.1.mlp.down_proj.weight' holds 1 NaN/Inf", capsys, [m])


def test_inf_weight_streamed_names_the_weight(model_copy, capsys):
    m = model_copy()
    _poison(m / "model.safetensors", "model.layers.1.self_attn.k_proj.weight", struct.pack("<f", float("inf")))
    refused(["scan", "--stream", "--quiet", *CALIB_SMALL, "--model", m],
            "weight 'model.layers.1.self_attn.k_proj.weight' holds 1 NaN/Inf", capsys, [m])


def _shard(m: Path) -> Path:
    """Re-save the tiny model as 3+ shards with an index; returns the directory."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(m)
    (m / "model.safetensors").unlink()
    model.save_pretrained(m, max_shard_size="200KB")
    assert (m / "model.safetensors.index.json").is_file()
    return m


def test_index_points_at_missing_shard(model_copy, capsys):
    m = _shard(model_copy())
    shards = sorted(m.glob("model-*.safetensors"))
    shards[1].unlink()
    refused([*EVAL, "--model", m], f"are missing: {shards[1].name}", capsys, [m])
    refused(["scan", "--stream", "--quiet", "--model", m], "are missing", capsys, [m])


def test_index_names_tensor_absent_from_shard(model_copy, capsys):
    m = _shard(model_copy())
    index = m / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = sorted(data["weight_map"])[0]
    other = sorted({v for v in data["weight_map"].values() if v != data["weight_map"][first]})[0]
    data["weight_map"][first] = other
    index.write_text(json.dumps(data))
    refused([*EVAL, "--model", m], f"the index lists tensor {first!r} in this shard", capsys, [m])


# --- GGUF ---------------------------------------------------------------------------------------

def write_gguf(path: Path, arch: str = "llama", chat_template: str | None = None) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_head_count(2)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_bad_magic(tmp_path, capsys):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGML" + bytes(200))
    refused([*EVAL, "--model", f], "not a GGUF file (bad magic b'GGML'", capsys, [tmp_path])


def test_gguf_truncated_data(tmp_path, capsys):
    f = write_gguf(tmp_path / "model.gguf")
    f.write_bytes(f.read_bytes()[:-16])
    refused([*EVAL, "--model", f], "truncated GGUF file (tensor data needs", capsys, [tmp_path])


def test_gguf_truncated_header(tmp_path, capsys):
    f = write_gguf(tmp_path / "model.gguf")
    f.write_bytes(f.read_bytes()[:60])
    refused([*EVAL, "--model", f], "truncated GGUF file (the header ends", capsys, [tmp_path])


def test_gguf_unsupported_architecture(tmp_path, capsys):
    f = write_gguf(tmp_path / "model.gguf", arch="mamba")
    refused([*EVAL, "--model", f], "GGUF architecture 'mamba' is not supported", capsys, [tmp_path])


def test_gguf_unsupported_version(tmp_path, capsys):
    f = write_gguf(tmp_path / "model.gguf")
    raw = bytearray(f.read_bytes())
    raw[4:8] = struct.pack("<I", 99)
    f.write_bytes(bytes(raw))
    refused([*EVAL, "--model", f], "unsupported GGUF version 99", capsys, [tmp_path])


# --- config.json --------------------------------------------------------------------------------

def _edit_config(m: Path, **changes) -> None:
    cfg = json.loads((m / "config.json").read_text())
    cfg.update(changes)
    (m / "config.json").write_text(json.dumps(cfg))


def test_unknown_model_type(model_copy, capsys):
    m = model_copy()
    _edit_config(m, model_type="llama9000")
    line = refused([*EVAL, "--model", m], "unsupported architecture 'llama9000'", capsys, [m])
    assert "config.json" in line and "supported: " in line
    refused(["scan", "--stream", "--quiet", "--model", m], "unsupported architecture 'llama9000'", capsys, [m])


def test_config_json_not_json(model_copy, capsys):
    m = model_copy()
    (m / "config.json").write_text('{"model_type": "llama",')
    refused([*EVAL, "--model", m], "config.json: not valid JSON", capsys, [m])


def test_pickle_weights_only_refused(model_copy, capsys):
    """Refused with the reason; the pickle is never opened (see test_security for the planted one)."""
    m = model_copy()
    (m / "model.safetensors").unlink()
    (m / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    refused([*EVAL, "--model", m], "only pickled weights (.bin/.pt) found", capsys, [m])


def test_remote_code_needed_refused(model_copy, capsys):
    m = model_copy()
    _edit_config(m, model_type="wizard", auto_map={"AutoConfig": "configuration_wizard.WizardConfig",
                                                   "AutoModelForCausalLM": "modeling_wizard.WizardForCausalLM"})
    line = refused([*EVAL, "--model", m], "the model needs its own code", capsys, [m])
    assert "--trust-remote-code" in line


# --- numbers in weights and activations ---------------------------------------------------------

def _overflowing_model(m: Path) -> None:
    """Finite weights whose activations overflow fp32 in block 0's MLP: the input of
    model.layers.0.mlp.down_proj becomes Inf/NaN during calibration."""
    from safetensors.torch import load_file, save_file

    t = load_file(m / "model.safetensors")
    t["model.layers.0.mlp.up_proj.weight"].fill_(3e38)
    save_file(t, m / "model.safetensors", metadata={"format": "pt"})


def test_nan_in_calibration_activations_names_the_layer(model_copy, capsys, tmp_path):
    m = model_copy()
    _overflowing_model(m)
    out = tmp_path / "out"
    out.mkdir()
    line = refused(["export", "--scheme", "w8a8-channel-tensor-static", *CALIB_SMALL, "--model", m,
                    "--out", out / "ckpt"], "the input of layer model.layers.0.mlp.down_proj (block 0) holds",
                   capsys, [m, out])
    assert "calibration" in line


def test_nan_in_scan_activations_names_the_layer(model_copy, capsys, tmp_path):
    m = model_copy()
    _overflowing_model(m)
    refused(["scan", "--quiet", *CALIB_SMALL, "--model", m, "--json", tmp_path / "s.json"],
            "the input of layer model.layers.0.mlp.down_proj (block 0)", capsys, [m, tmp_path])


# --- plans: recipes and scheme files ------------------------------------------------------------

RECIPE = ("qdoctor_recipe: {version}\nmodel: other-model\n"
          "calibration: {{n_samples: 2, seqlen: {seqlen}, source: wikitext2:valid, seed: 0}}\n"
          "smoothing: []\n"
          "scheme: {{name: r, default: {{weights: {{dtype: int8, granularity: channel}}, "
          "activations: {{dtype: int8, granularity: tensor, dynamic: false}}}}, "
          "overrides: {{{override}: {{keep: bf16}}}}}}\n")


def _recipe(tmp_path: Path, version=1, seqlen=16, override="model.layers.1.mlp.down_proj") -> Path:
    f = tmp_path / "plan.yaml"
    f.write_text(RECIPE.format(version=version, seqlen=seqlen, override=override))
    return f


def test_recipe_from_another_model(tiny_llama_dir, tmp_path, capsys):
    r = _recipe(tmp_path, override="model.layers.27.mlp.down_proj")
    out = tmp_path / "out"
    out.mkdir()
    line = refused(["export", "--recipe", r, "--model", tiny_llama_dir, "--out", out / "ckpt"],
                   "override 'model.layers.27.mlp.down_proj' matches no linear layer of this model", capsys,
                   [out, tiny_llama_dir])
    assert "'other-model'" in line
    refused(["quantize", "--recipe", r, "--model", tiny_llama_dir, "--seqlen", "32", "--limit", "1"],
            "matches no linear layer", capsys)


def test_recipe_of_newer_schema_version(tiny_llama_dir, tmp_path, capsys):
    r = _recipe(tmp_path, version=2)
    refused(["export", "--recipe", r, "--model", tiny_llama_dir, "--out", tmp_path / "ckpt"],
            "recipe version 2 is not supported (this qdoctor reads 1)", capsys, [tmp_path])


def test_malformed_yaml_recipe(tiny_llama_dir, tmp_path, capsys):
    r = tmp_path / "plan.yaml"
    r.write_text("qdoctor_recipe: 1\nscheme: {name: x, default: [unclosed\n")
    refused(["export", "--recipe", r, "--model", tiny_llama_dir, "--out", tmp_path / "ckpt"],
            "not valid YAML/JSON", capsys, [tmp_path])


def test_malformed_json_scheme_file(tiny_llama_dir, tmp_path, capsys):
    s = tmp_path / "scheme.json"
    s.write_text('{"name": "x", "default": {"weights": ')
    refused(["eval", "--scheme-file", s, "--model", tiny_llama_dir, *EVAL_SMALL], "not valid JSON", capsys,
            [tmp_path])


def test_group_size_not_dividing_k(tiny_llama_dir, tmp_path, capsys):
    s = tmp_path / "g.json"
    s.write_text(json.dumps({"name": "g48", "default": {"weights": {"dtype": "int8", "granularity": "group:48"},
                                                        "activations": {"dtype": "int8", "granularity": "token",
                                                                        "dynamic": True}}}))
    out = tmp_path / "out"
    out.mkdir()
    refused(["export", "--scheme-file", s, "--model", tiny_llama_dir, "--out", out / "ckpt", "--serve", "any"],
            "group size 48 does not divide the input dimension 64", capsys, [out])  # vLLM would refuse per-group first


# --- lengths and text ---------------------------------------------------------------------------

def test_seqlen_longer_than_context(tiny_llama_dir, capsys):
    refused(["eval", "--scheme", "w8a8-channel-token", "--seqlen", "4096", "--limit", "1", "--model",
             tiny_llama_dir], "--seqlen 4096 is longer than the model's context (512 tokens", capsys)
    refused(["scan", "--quiet", "--calib-samples", "1", "--calib-seqlen", "1024", "--model", tiny_llama_dir],
            "--calib-seqlen 1024 is longer than the model's context", capsys)


def test_recipe_calibration_longer_than_context(tiny_llama_dir, tmp_path, capsys):
    r = _recipe(tmp_path, seqlen=2048)
    out = tmp_path / "out"
    out.mkdir()
    refused(["export", "--recipe", r, "--model", tiny_llama_dir, "--out", out / "ckpt"],
            "calibration seqlen 2048 is longer than the model's context", capsys, [out])


@pytest.mark.parametrize("kind,content,needle", [
    ("empty", b"", "the file is empty"),
    ("whitespace", b"  \n\t\n   \n", "the file holds only whitespace"),
    ("binary", bytes(range(256)) * 8, "not UTF-8 text"),
    ("nul", b"some text\nmore\x00\x00\x00\x01binary" * 50, ":2: holds a NUL byte"),
    ("controls", ("ab\x01\x02\x03\x04" * 400).encode(), "control characters"),
], ids=["empty", "whitespace", "binary", "nul", "controls"])
def test_bad_calibration_text(tiny_llama_dir, tmp_path, capsys, kind, content, needle):
    f = tmp_path / f"{kind}.txt"
    f.write_bytes(content)
    refused([*STATIC, "--calib-source", f, "--model", tiny_llama_dir, "--json", tmp_path / "r.json"], needle, capsys,
            [tmp_path])


def test_task_file_bad_line(tiny_llama_dir, tmp_path, capsys):
    data = tmp_path / "tasks"
    data.mkdir()
    good = {"goal": "g", "sol1": "a", "sol2": "b", "label": 0}
    lines = [json.dumps(good), json.dumps(good), '{"goal": "g", "sol1": ', json.dumps(good)]
    with gzip.open(data / "piqa.jsonl.gz", "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    refused(["eval", "--tasks", "piqa", "--task-data", data, "--model", tiny_llama_dir, "--json",
             tmp_path / "r.json"], "piqa.jsonl.gz:3: not valid JSON", capsys, [tmp_path])


# --- outputs ------------------------------------------------------------------------------------

def test_out_inside_model_directory(model_copy, capsys):
    m = model_copy()
    refused(["export", "--scheme", "w8a8-channel-token", "--model", m, "--out", m / "quantized"],
            "is inside the model directory", capsys, [m])


def test_out_is_model_directory_even_with_overwrite(model_copy, capsys):
    m = model_copy()
    refused(["export", "--scheme", "w8a8-channel-token", "--model", m, "--out", m, "--overwrite"],
            "is inside the model directory", capsys, [m])
    refused(["export", "--scheme", "w8a8-channel-token", "--model", m, "--out", m.parent, "--overwrite"],
            "exists and is not a model checkpoint", capsys, [m])


def test_existing_out_without_overwrite(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "config.json").write_text("{}")
    refused(["export", "--scheme", "w8a8-channel-token", "--model", tiny_llama_dir, "--out", out],
            "already exists; pass --overwrite", capsys, [tmp_path])


def _raise_on_fsync(errnum):
    def fsync(_fd):
        raise OSError(errnum, os.strerror(errnum))
    return fsync


def test_full_disk_for_json_report(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    import qdoctor.io

    monkeypatch.setattr(qdoctor.io.os, "fsync", _raise_on_fsync(errno.ENOSPC))
    refused([*EVAL, "--model", tiny_llama_dir, "--json", tmp_path / "r.json"],
            "r.json: cannot write (No space left on device); nothing was written", capsys, [tmp_path])


def test_read_only_disk_for_markdown_report(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    import qdoctor.io

    def mkstemp(*_a, **_k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(qdoctor.io.tempfile, "mkstemp", mkstemp)
    refused(["scan", "--quiet", *CALIB_SMALL, "--model", tiny_llama_dir, "--markdown", tmp_path / "s.md"],
            "s.md: cannot write (Read-only file system); nothing was written", capsys, [tmp_path])


def test_full_disk_during_export_checkpoint(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    """The checkpoint writer hits ENOSPC in the middle of the shards: one line, staging removed."""
    import qdoctor.export.checkpoint as ck

    real = ck.save_file

    def save_file(tensors, filename, *a, **k):
        real(dict(list(tensors.items())[:2]), filename, *a, **k)  # a partial file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ck, "save_file", save_file)  # the shard writer's
    out = tmp_path / "out"
    out.mkdir()
    refused(["export", "--scheme", "w8a8-channel-token", "--model", tiny_llama_dir, "--out", out / "ckpt"],
            "cannot write the checkpoint (No space left on device)", capsys, [out])


# --- numbers on the command line ----------------------------------------------------------------

@pytest.mark.parametrize("argv,needle", [
    (["fix", "--budget", "-3%"], "the budget must be ≥ 0%"),
    (["fix", "--budget", "-0.5"], "the budget must be ≥ 0%"),
    (["fix", "--max-layers", "-5%"], "the budget must be ≥ 0%"),
    (["fix", "--budget", "nan%"], "bad budget 'nan%': use a finite percentage"),
])
def test_negative_numbers_reach_their_parser(tiny_llama_dir, capsys, argv, needle):
    refused([*argv, "--model", tiny_llama_dir], needle, capsys)


def test_negative_count_is_argparse_one_line(tiny_llama_dir, capsys):
    from qdoctor.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", "--limit", "-1", "--model", str(tiny_llama_dir)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "expected a positive integer, got -1" in err and "Traceback" not in err


def test_bad_shard_size_is_refused_before_loading(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    import qdoctor.cli.export_cmd as export_cmd

    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded for a bad --max-shard-size")

    monkeypatch.setattr(export_cmd, "load_model", no_load)
    out = tmp_path / "out"
    out.mkdir()
    refused(["export", "--scheme", "w8a8-channel-token", "--model", tiny_llama_dir, "--out", out / "ckpt",
             "--max-shard-size", "lots"], "bad shard size 'lots'", capsys, [out])
