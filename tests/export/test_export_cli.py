"""``qdoctor export``: a checkpoint and a report on success; one line and exit 2 on bad input, nothing written."""

import json
import subprocess
import sys

import pytest

from qdoctor.cli import main

CALIB = ["--calib-samples", "4", "--calib-seqlen", "32"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qdoctor.cli", *args], capture_output=True, text=True, timeout=600)


def test_export_static_scheme_with_card_and_json(tiny_llama_dir, tmp_path, capsys):
    card = tmp_path / "card.yaml"
    card.write_text("title: tiny test export\nevidence: {lm_head: 'left in fp32 on purpose'}\nnotes: [a note]\n")
    out, rep = tmp_path / "ckpt", tmp_path / "r.json"
    code = main(["export", "--model", str(tiny_llama_dir), "--scheme", "w8a8-channel-tensor-static", "--out", str(out),
                 "--card", str(card), "--json", str(rep), "--ppl-windows", "1", "--ppl-seqlen", "64", *CALIB])
    assert code == 0
    report = json.loads(rep.read_text())
    assert report["format"] == "int-quantized" and report["groups"][0]["n_layers"] == 14
    assert report["total_bytes"] == sum(p.stat().st_size for p in out.iterdir())
    readme = (out / "README.md").read_text()
    assert "# tiny test export" in readme and "left in fp32 on purpose" in readme and "a note" in readme
    assert "4 × 32 tokens of wikitext2:valid (seed 0)" in readme  # the calibration actually used
    assert "| full_precision |" in readme and "| w8a8-channel-tensor-static |" in readme
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["input_activations"]["dynamic"] is False
    assert "wrote" in capsys.readouterr().out


def test_export_scheme_file_mixed(tiny_llama_dir, tmp_path):
    scheme = tmp_path / "s.json"
    scheme.write_text(json.dumps({"name": "mix", "default": {"weights": {"dtype": "int8", "granularity": "channel"},
                                                             "activations": {"dtype": "int8", "granularity": "token",
                                                                             "dynamic": True}},
                                  "overrides": {"model.layers.1.*": {"weights": {"dtype": "fp8", "granularity": "tensor"},
                                                                     "activations": {"dtype": "fp8", "granularity": "tensor",
                                                                                     "dynamic": True}},
                                                "model.layers.0.mlp.down_proj": {"keep": "bf16"}}}))
    out = tmp_path / "ckpt"
    assert main(["export", "--model", str(tiny_llama_dir), "--scheme-file", str(scheme), "--out", str(out),
                 "--serve", "transformers"]) == 0  # dynamic per-tensor FP8 runs per token in vLLM
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision" and "model.layers.0.mlp.down_proj" in qc["ignore"]


def test_export_recipe(tiny_llama_dir, tmp_path):
    pytest.importorskip("qdoctor.policy.recipe")
    recipe = tmp_path / "plan.yaml"
    recipe.write_text(
        "qdoctor_recipe: 1\nmodel: tiny\n"
        "calibration: {n_samples: 4, seqlen: 32, source: wikitext2:valid, seed: 0}\n"
        "smoothing: [{method: smoothquant, alpha: 0.5, layers: ['*']}]\n"
        "scheme: {name: recipe-scheme, default: {weights: {dtype: int8, granularity: channel}, "
        "activations: {dtype: int8, granularity: tensor, dynamic: false}}, "
        "overrides: {model.layers.1.mlp.down_proj: {keep: bf16}}}\n"
        "evidence: {model.layers.1.mlp.down_proj: 'spike ratio 99 (test)'}\n"
        "metrics: {searched_plans: 3}\n")
    out = tmp_path / "ckpt"
    assert main(["export", "--model", str(tiny_llama_dir), "--recipe", str(recipe), "--out", str(out)]) == 0
    readme = (out / "README.md").read_text()
    assert "spike ratio 99 (test)" in readme and "searched_plans" in readme
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ["model.layers.1.mlp.down_proj", "lm_head"]


def _one_line_error(r, needle):
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("qdoctor: error")]) == 1


def test_existing_out_refused_before_loading(tiny_llama_dir, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    r = run_cli("export", "--model", str(tiny_llama_dir), "--scheme", "w8a8-channel-token", "--out", str(out))
    _one_line_error(r, "already exists")
    assert "loading" not in r.stderr  # refused before the model was loaded


@pytest.mark.parametrize("sub,needle", [("nope/ckpt", "does not exist"), ("file/ckpt", "is not a directory")])
def test_bad_parent_is_one_line(tiny_llama_dir, tmp_path, sub, needle):
    (tmp_path / "file").write_text("x")
    r = run_cli("export", "--model", str(tiny_llama_dir), "--scheme", "w8a8-channel-token", "--out",
                str(tmp_path / sub))
    _one_line_error(r, needle)


def test_unsupported_plan_is_one_line_and_writes_nothing(tiny_llama_dir, tmp_path):
    scheme = tmp_path / "s.json"
    scheme.write_text(json.dumps({"name": "k", "default": {"weights": {"dtype": "int8", "granularity": "channel"},
                                                           "activations": None},
                                  "overrides": {"model.layers.0.mlp.down_proj": {"keep": "fp16"}}}))
    work = tmp_path / "work"
    work.mkdir()
    r = run_cli("export", "--model", str(tiny_llama_dir), "--scheme-file", str(scheme), "--out", str(work / "ckpt"),
                "--save-dtype", "bf16")
    _one_line_error(r, "kept in fp16 but the checkpoint dtype is bf16")
    assert list(work.iterdir()) == []


def test_require_vllm_is_one_line(tiny_llama_dir, tmp_path):
    scheme = tmp_path / "g.json"
    scheme.write_text(json.dumps({"name": "g", "default": {"weights": {"dtype": "int8", "granularity": "group:32"},
                                                           "activations": {"dtype": "int8", "granularity": "token",
                                                                           "dynamic": True}}}))
    r = run_cli("export", "--model", str(tiny_llama_dir), "--scheme-file", str(scheme), "--out",
                str(tmp_path / "ckpt"), "--require-vllm")
    _one_line_error(r, "vLLM cannot serve this plan")
    assert not (tmp_path / "ckpt").exists()


def test_scheme_is_required(tmp_path):
    r = run_cli("export", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "one of the arguments --scheme --scheme-file --recipe is required" in r.stderr


def test_bad_card_file_is_one_line(tiny_llama_dir, tmp_path):
    card = tmp_path / "c.yaml"
    card.write_text("ppl: 1\nspeed: fast\n")
    r = run_cli("export", "--model", str(tiny_llama_dir), "--scheme", "w8a8-channel-token", "--out",
                str(tmp_path / "ckpt"), "--card", str(card))
    _one_line_error(r, "unknown card key(s) speed")
