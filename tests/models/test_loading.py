import pytest

import qdoctor
from helpers import save_tiny
from qdoctor.errors import QDoctorError
from qdoctor.models.loading import describe_source


def test_sharded_safetensors_dir(tmp_path):
    import torch

    from helpers import tiny_model, tiny_tokenizer

    m = tiny_model("mistral")
    m.save_pretrained(tmp_path, max_shard_size="200KB")
    tiny_tokenizer().save_pretrained(tmp_path)
    shards = list(tmp_path.glob("*.safetensors"))
    assert len(shards) > 1
    model, _ = qdoctor.load(str(tmp_path), device="cpu")
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, m(ids).logits)


def test_source_errors(tmp_path):
    with pytest.raises(QDoctorError, match="no such file"):
        describe_source(str(tmp_path / "missing"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(QDoctorError, match="not a model"):
        describe_source(str(tmp_path / "notes.txt"))
    with pytest.raises(QDoctorError, match="not a model directory"):
        describe_source(str(tmp_path))
    with pytest.raises(QDoctorError, match="unknown built-in|no such file"):
        qdoctor.load("smollm9-1b")
    assert describe_source("meta-llama/Llama-3.1-70B")["kind"] == "hub"


def test_pickle_only_dir_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(QDoctorError, match="safetensors or GGUF only"):
        describe_source(str(tmp_path))


def test_unsupported_architecture_dir(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(QDoctorError, match="unsupported architecture 'gpt2'"):
        qdoctor.load(str(tmp_path), device="cpu")


def test_bad_dtype():
    with pytest.raises(QDoctorError, match="dtype"):
        from qdoctor.models.loading import resolve_dtype

        resolve_dtype("int3", "cpu")
