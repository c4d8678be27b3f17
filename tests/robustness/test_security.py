"""Security (issue 18, item 5): no model-provided code runs and nothing is unpickled by default,
GGUF metadata stays data, and paths from configs or recipes cannot leave their directory."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

import qdoctor
from qdoctor.errors import QDoctorError

from .conftest import refused, snapshot, write_tiny_llama_gguf


class _Planted:
    """Unpickling this runs ``exec`` — it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def plant_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"model.embed_tokens.weight": _Planted(marker)}))
    assert not marker.exists()


@pytest.fixture
def no_unpickling(monkeypatch):
    """torch.load and pickle.load(s) fail the test if anything calls them."""
    import torch

    def forbidden(*_a, **_k):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)


def test_the_planted_payloads_are_live(tmp_path):
    """Controls: unpickling the planted pickle, or importing the planted module, does create the
    marker — so the tests below would see it if qdoctor ever did either."""
    marker = tmp_path / "PWNED"
    plant_pickle(tmp_path / "p.bin", marker)
    pickle.loads((tmp_path / "p.bin").read_bytes())
    assert marker.exists()
    marker.unlink()
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text("{}")
    _plant_code(m, marker, "evil")
    exec(compile((m / "configuration_evil.py").read_text(), "configuration_evil.py", "exec"), {})
    assert marker.exists()


def test_planted_pickle_is_never_loaded(model_copy, tmp_path, capsys, no_unpickling):
    m = model_copy()
    marker = tmp_path / "PWNED"
    (m / "model.safetensors").unlink()
    plant_pickle(m / "pytorch_model.bin", marker)
    for stream in (False, True):
        with pytest.raises(QDoctorError, match="only pickled weights"):
            qdoctor.load(str(m), device="cpu", stream=stream)
    refused(["eval", "--model", m, "--seqlen", "32", "--limit", "1"], "only pickled weights", capsys)
    assert not marker.exists()


def test_pickle_beside_safetensors_is_ignored(model_copy, tmp_path, no_unpickling):
    m = model_copy()
    marker = tmp_path / "PWNED"
    plant_pickle(m / "pytorch_model.bin", marker)
    plant_pickle(m / "training_args.bin", marker)
    model, _ = qdoctor.load(str(m), device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    from qdoctor.models.lazy import load_lazy

    load_lazy(str(m), dtype=model.dtype, device="cpu")
    assert not marker.exists()


def _plant_code(m: Path, marker: Path, model_type: str) -> None:
    cfg = json.loads((m / "config.json").read_text())
    cfg.update(model_type=model_type, auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (m / "config.json").write_text(json.dumps(cfg))
    code = f"open({str(marker)!r}, 'w').write('pwned')\n"
    (m / "configuration_evil.py").write_text(code)
    (m / "modeling_evil.py").write_text(code)


def test_remote_code_is_refused_and_never_imported(model_copy, tmp_path, capsys):
    m = model_copy()
    marker = tmp_path / "PWNED"
    _plant_code(m, marker, "evil")
    for stream in (False, True):
        with pytest.raises(QDoctorError, match="needs its own code"):
            qdoctor.load(str(m), device="cpu", stream=stream)
    refused(["scan", "--quiet", "--model", m], "pass --trust-remote-code", capsys)
    assert not marker.exists()


def test_known_architecture_with_auto_map_uses_library_code(model_copy, tmp_path):
    m = model_copy()
    marker = tmp_path / "PWNED"
    _plant_code(m, marker, "llama")
    model, _ = qdoctor.load(str(m), device="cpu")
    assert type(model).__module__.startswith("transformers.models.llama")
    assert not marker.exists()


def test_gguf_metadata_is_data_and_chat_template_never_rendered(tmp_path, monkeypatch):
    import jinja2

    from qdoctor.models.gguf_check import read_gguf_header

    rendered = []

    def no_compile(self, source, *a, **k):
        rendered.append(source)
        raise AssertionError("a template was compiled while loading")

    monkeypatch.setattr(jinja2.Environment, "from_string", no_compile)
    template = "{{ raise_exception('RENDERED') }}{% for m in messages %}{{ m.content }}{% endfor %}"
    name = "{{ 7 * 7 }} %s %(x)s ${HOME} $(touch pwned)"
    f = write_tiny_llama_gguf(tmp_path / "tiny.gguf", chat_template=template, name=name)
    header = read_gguf_header(f)
    assert header["metadata"]["tokenizer.chat_template"] == template
    assert header["metadata"]["general.name"] == name
    model, tok = qdoctor.load(str(f), device="cpu")
    assert tok.chat_template == template  # kept verbatim, as data
    assert rendered == []
    with pytest.raises(AssertionError):  # control: rendering it would have gone through the patch
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../x.safetensors"])
def test_index_shard_paths_cannot_leave_the_model_directory(model_copy, capsys, shard):
    m = model_copy()
    from safetensors.torch import load_file

    names = list(load_file(m / "model.safetensors"))
    weight_map = {n: "model.safetensors" for n in names}
    weight_map[names[0]] = shard
    (m / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for stream in (False, True):
        with pytest.raises(QDoctorError, match="is outside the model directory"):
            qdoctor.load(str(m), device="cpu", stream=stream)


def test_recipe_and_card_names_cannot_steer_output_paths(tiny_llama_dir, tmp_path):
    """Strings a recipe or card carries (model, scheme name, evidence keys, title) that look like
    paths stay text: the export writes regular files inside --out only."""
    from qdoctor.cli import main

    work = tmp_path / "work"
    work.mkdir()
    evil = "../../escaped"
    recipe = work / "plan.yaml"
    recipe.write_text(
        f"qdoctor_recipe: 1\nmodel: '{evil}'\n"
        "calibration: {n_samples: 2, seqlen: 16, source: wikitext2:valid, seed: 0}\n"
        f"scheme: {{name: '{evil}/scheme', default: {{weights: {{dtype: int8, granularity: channel}}, "
        "activations: {dtype: int8, granularity: tensor, dynamic: false}}}\n"
        f"evidence: {{'{evil}/x': '/etc/passwd'}}\n")
    card = work / "card.yaml"
    card.write_text(f"title: '{evil}/title'\nnotes: ['/etc/passwd']\n")
    before = snapshot(tmp_path)
    out = work / "ckpt"
    assert main(["export", "--model", str(tiny_llama_dir), "--recipe", str(recipe), "--card", str(card),
                 "--out", str(out)]) == 0
    new = sorted(set(snapshot(tmp_path)) - set(before))
    assert new and all(Path(p).parent == out or Path(p) == out for p in new), new
    assert all(p.is_file() and not p.is_symlink() for p in out.iterdir())
    assert not (tmp_path / "escaped").exists() and not any(tmp_path.parent.glob("escaped*"))
