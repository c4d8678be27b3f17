"""The command line: one clear line and exit 2 for bad input, a table and JSON on success."""

import json
import subprocess
import sys

import pytest

from qdoctor.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qdoctor.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("args,needle", [
    (["eval", "--model", "/nonexistent/model"], "no such file"),
    (["eval", "--model", "smollm9"], "not a built-in model"),
    (["eval", "--scheme", "w4a4-magic"], "unknown scheme"),
    (["eval", "--json", "/nonexistent/dir/out.json"], "does not exist"),
])
def test_bad_input_is_one_line_no_traceback(args, needle):
    r = run_cli(*args)
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("qdoctor: error")]) == 1


def test_argparse_rejects_bad_numbers():
    r = run_cli("eval", "--limit", "0")
    assert r.returncode == 2 and "positive integer" in r.stderr


def test_eval_tiny_model_writes_json(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["eval", "--model", str(tiny_llama_dir), "--scheme", "w8a8-channel-token,w8a8-channel-tensor-static",
                 "--seqlen", "64", "--limit", "2", "--calib-samples", "4", "--calib-seqlen", "32",
                 "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    names = [r["scheme"] for r in report["results"]]
    assert names == ["full-precision", "w8a8-channel-token", "w8a8-channel-tensor-static"]
    assert report["windows"] == 2 and report["results"][1]["quantized_layers"] == 14
    fp = report["results"][0]["ppl"]
    assert report["results"][1]["delta_pct"] == pytest.approx(100 * (report["results"][1]["ppl"] / fp - 1))
    assert "w8a8-channel-token" in capsys.readouterr().out
    assert not list(tmp_path.glob(".r.json.*"))  # no temporary left behind


def test_group_size_not_dividing_is_clear(tiny_llama_dir, tmp_path, capsys):
    scheme = tmp_path / "g.json"
    scheme.write_text(json.dumps({"name": "g48", "default": {"weights": {"dtype": "int8", "granularity": "group:48"},
                                                              "activations": None}}))
    out = tmp_path / "never.json"
    code = main(["eval", "--model", str(tiny_llama_dir), "--scheme-file", str(scheme), "--seqlen", "64",
                 "--limit", "1", "--json", str(out)])
    assert code == 2
    assert "does not divide" in capsys.readouterr().err
    assert not out.exists()


def test_models_lists_builtins(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "gemma3_text" in out and "w8a8-tensor-tensor-static" in out


def test_eval_tasks_side_by_side(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "t.json"
    code = main(["eval", "--model", str(tiny_llama_dir), "--scheme", "w8a8-channel-token", "--tasks", "piqa,boolq",
                 "--task-limit", "3", "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    q = [r for r in rows if r["plan"] == "w8a8-channel-token" and r["task"] == "piqa" and r["metric"] == "acc"][0]
    f = [r for r in rows if r["plan"] == "full-precision" and r["task"] == "piqa" and r["metric"] == "acc"][0]
    assert q["items"] == 3 and q["delta"] == pytest.approx(q["value"] - f["value"])
    assert "piqa" in capsys.readouterr().out
    assert main(["eval", "--model", str(tiny_llama_dir), "--tasks", "piqa,nope"]) == 2
