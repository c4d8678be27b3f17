"""Faults during long work (issue 18, item 2): SIGINT and SIGKILL at the write points of
``export``, ``fix --recipe-out`` and ``scan --json/--html`` (and at random wall-clock times).
The output path always holds its old content or the complete new one — never a partial file or
directory; temporaries are removed on SIGINT, and those of a SIGKILLed run by the next run.

In-process runs raise ``KeyboardInterrupt`` (what SIGINT delivers) at the k-th file operation
(``faults.inject``); subprocess runs get real signals. Everything is seeded (SEED)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qdoctor.cli import main

from .faults import inject

SEED = 18
RUNNER = Path(__file__).with_name("faults.py")


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory) -> Path:
    """A small calibration text (tokenizing all of WikiText-2 valid would dominate each run)."""
    from qdoctor.calib.text import wikitext_text

    f = tmp_path_factory.mktemp("calib") / "calib.txt"
    f.write_text(wikitext_text("valid")[:20_000])
    return f


def _export_argv(model, out, calib):
    return ["export", "--model", str(model), "--scheme", "w8a8-channel-tensor-static", "--calib-samples", "2",
            "--calib-seqlen", "16", "--calib-source", str(calib), "--out", str(out), "--overwrite"]


def _scan_argv(model, js, html, calib):
    return ["scan", "--quiet", "--model", str(model), "--calib-samples", "2", "--calib-seqlen", "16",
            "--calib-source", str(calib), "--json", str(js), "--html", str(html)]


def _fix_argv(model, recipe, calib):
    return ["fix", "--model", str(model), "--target", "w8a8-channel-static", "--budget", "50%", "--eval-windows",
            "1", "--eval-seqlen", "32", "--limit", "1", "--seqlen", "32", "--calib-samples", "2", "--calib-seqlen",
            "32", "--calib-source", str(calib), "--sample-rows", "16", "--recipe-out", str(recipe)]


def _make_old_checkpoint(out: Path) -> None:
    out.mkdir()
    (out / "config.json").write_text('{"old": true}')
    (out / "OLD").write_text("the previous checkpoint")


def _dir_sig(d: Path):
    if not d.exists():
        return None
    return tuple(sorted((p.name, hashlib.sha256(p.read_bytes()).hexdigest() if p.name in (
        "model.safetensors", "config.json", "OLD", "tokenizer.json") else "") for p in d.iterdir()))


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def _memo(fn, cache: dict, key: str):
    def f(*a, **k):
        if key not in cache:
            cache[key] = fn(*a, **k)
        return cache[key]
    return f


def _export_with_old_checkpoint(model, tmp_path: Path, calib: Path):
    """(write-point counter of a clean export, its checkpoint's signature, the target holding an old
    checkpoint, that old checkpoint's signature)."""
    ref = tmp_path / "ref" / "ckpt"
    ref.parent.mkdir()
    with inject(0) as counted:
        assert main(_export_argv(model, ref, calib)) == 0
    out = tmp_path / "ckpt"
    _make_old_checkpoint(out)
    return counted, _dir_sig(ref), out, _dir_sig(out)


def _points(n: int, how_many: int, rng: random.Random) -> list[int]:
    """A seeded sample of write points 1..n, always with the first and the last."""
    return sorted({1, n, *rng.sample(range(1, n + 1), min(n, how_many))})


def test_sigint_at_write_points_of_export(tiny_llama_dir, tmp_path, calib_text, capsys):
    counted, new, out, old = _export_with_old_checkpoint(tiny_llama_dir, tmp_path, calib_text)
    seen = set()
    for k in _points(counted.count, 6, random.Random(SEED)):
        with inject(k) as inj:
            assert main(_export_argv(tiny_llama_dir, out, calib_text)) == 130, f"k={k}: {inj.events}"
        sig = _dir_sig(out)
        assert sig in (old, new), f"interrupted at write {k} ({inj.events[-1]}): partial checkpoint"
        assert _leftovers(tmp_path, "ckpt") == [], f"k={k}"
        seen.add("old" if sig == old else "new")
    assert seen == {"old"}  # an interrupt before the final exchange keeps the old checkpoint
    assert "qdoctor: interrupted" in capsys.readouterr().err
    assert main(_export_argv(tiny_llama_dir, out, calib_text)) == 0 and _dir_sig(out) == new


def test_sigint_at_write_points_of_scan_reports(tiny_llama_dir, tmp_path, calib_text, monkeypatch):
    import qdoctor.report.html as html_mod

    real_render, cache = html_mod.render_html, {}
    monkeypatch.setattr(html_mod, "render_html", _memo(real_render, cache, "html"))
    js, html = tmp_path / "scan.json", tmp_path / "scan.html"
    with inject(0) as counted:
        assert main(_scan_argv(tiny_llama_dir, js, html, calib_text)) == 0
    new_html = html.read_text()
    for k in range(1, counted.count + 1):  # every write point (6)
        js.write_text("old json")
        html.write_text("old html")
        with inject(k):
            assert main(_scan_argv(tiny_llama_dir, js, html, calib_text)) == 130
        j = js.read_text()
        assert j == "old json" or json.loads(j)["schema"].startswith("qdoctor.scan/"), f"k={k}"
        assert html.read_text() in ("old html", new_html), f"k={k}"
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], f"k={k}"


def test_sigint_at_write_points_of_fix_recipe(tiny_llama_dir, tmp_path, calib_text, monkeypatch):
    """The search and verification are memoized after the first run (they are not what is being
    interrupted); every run still loads the model and writes the recipe."""
    import qdoctor.cli.fix_cmd as fix_cmd
    import qdoctor.policy.search as search_mod

    real_search, real_verify, cache = search_mod.search, fix_cmd.verify, {}
    monkeypatch.setattr(search_mod, "search", _memo(real_search, cache, "search"))
    monkeypatch.setattr(fix_cmd, "verify", _memo(real_verify, cache, "verify"))
    recipe = tmp_path / "plan.yaml"
    with inject(0) as counted:
        assert main(_fix_argv(tiny_llama_dir, recipe, calib_text)) == 0
    new = recipe.read_text()
    for k in range(1, counted.count + 1):
        recipe.write_text("old recipe")
        with inject(k):
            assert main(_fix_argv(tiny_llama_dir, recipe, calib_text)) == 130
        assert recipe.read_text() in ("old recipe", new), f"k={k}"
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], f"k={k}"


def _fork_run(argv: list[str], log: Path, action: str = "count", k: int = 0,
              signal_after: "tuple[int, float] | None" = None) -> tuple[int, int, str]:
    """Run ``qdoctor argv`` in a forked child (everything already imported: ~0.1 s a run instead of
    ~7 s for a fresh interpreter) under ``inject(k, action)``; ``signal_after=(sig, seconds)``
    has the parent send a real signal at that time. Returns (exit code, child pid, its output).
    The child uses one torch thread (a forked OpenMP pool can deadlock)."""
    import torch

    pid = os.fork()
    if pid == 0:  # child
        code = 99
        try:
            torch.set_num_threads(1)
            # Ctrl-C as a terminal delivers it: a suite started in the background (`cmd &`, nohup)
            # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler
            signal.signal(signal.SIGINT, signal.default_int_handler)
            # tqdm's write lock is a multiprocessing lock shared with the parent across fork: a child
            # SIGKILLed while holding it would leave the parent's next progress bar waiting forever
            import threading

            from tqdm.std import tqdm as tqdm_cls

            tqdm_cls.set_lock(threading.RLock())
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = sys.stderr = os.fdopen(os.dup(2), "w", buffering=1)
            import faulthandler

            faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)  # a hang shows where
            with inject(k, action):
                code = main(argv)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    t0 = time.monotonic()
    sent = signal_after is None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), pid, log.read_text()
        if not sent and time.monotonic() - t0 >= signal_after[1]:
            os.kill(pid, signal_after[0])
            sent = True
        if time.monotonic() - t0 > 60:
            os.kill(pid, signal.SIGUSR1)
            time.sleep(1.0)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"{argv[0]}: child did not finish in 60 s:\n{log.read_text()[-4000:]}")
        time.sleep(0.002)


def _check_export_dir(out: Path, old, new, killed: set, what: str) -> str:
    """``out`` is the old or the new checkpoint; any temporary beside it belongs to a killed child
    (a child killed before it reached the export cannot have removed an earlier one's)."""
    sig = _dir_sig(out)
    assert sig in (old, new), f"{what}: partial checkpoint at {out}"
    left = _leftovers(out.parent, out.name)
    assert all(any(f".{out.name}.tmp-{pid}-" in f or f".{out.name}.old-{pid}-" in f for pid in killed)
               for f in left), (what, left)
    return "old" if sig == old else "new"


def test_sigkill_at_every_write_point_of_export(tiny_llama_dir, tmp_path, calib_text, capsys):
    counted, new, out, old = _export_with_old_checkpoint(tiny_llama_dir, tmp_path, calib_text)
    outcomes = []
    for k in range(1, counted.count + 1):
        code, pid, log = _fork_run(_export_argv(tiny_llama_dir, out, calib_text), tmp_path / "log", "sigkill", k)
        assert code == -signal.SIGKILL, log
        outcomes.append(_check_export_dir(out, old, new, {pid}, f"SIGKILL at write {k}"))
    assert outcomes == ["old"] * counted.count
    assert any(p.name.startswith(".ckpt.tmp-") for p in tmp_path.iterdir())  # kill -9 leaves its staging dir …
    capsys.readouterr()
    assert main(_export_argv(tiny_llama_dir, out, calib_text)) == 0 and _dir_sig(out) == new
    assert "left by an interrupted run" in capsys.readouterr().err  # … which the next run removes, saying so
    assert _leftovers(tmp_path, "ckpt") == []


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_signal_at_random_times_during_export(tiny_llama_dir, tmp_path, calib_text, sig):
    """12 real signals at seeded uniform times over a whole export (load, calibration,
    quantization, writing, publishing), replacing an old checkpoint."""
    ref = tmp_path / "ref" / "ckpt"
    ref.parent.mkdir()
    code, _, log = _fork_run(_export_argv(tiny_llama_dir, ref, calib_text), tmp_path / "log")
    assert code == 0, log
    t0 = time.monotonic()
    code, _, log = _fork_run(_export_argv(tiny_llama_dir, ref, calib_text), tmp_path / "log")
    duration = time.monotonic() - t0
    assert code == 0, log
    new = _dir_sig(ref)
    out = tmp_path / "ckpt"
    rng = random.Random(SEED + int(sig))
    outcomes, killed = [], set()
    for i in range(12):
        if not out.exists() or _dir_sig(out) == new:
            import shutil

            shutil.rmtree(out, ignore_errors=True)
            _make_old_checkpoint(out)
        old = _dir_sig(out)
        code, pid, log = _fork_run(_export_argv(tiny_llama_dir, out, calib_text), tmp_path / "log",
                                   signal_after=(sig, rng.uniform(0.0, duration * 1.1)))
        assert "Traceback" not in log, log
        assert code in ((-signal.SIGKILL, 0) if sig == signal.SIGKILL else (130, 0)), (code, log)
        if code == -signal.SIGKILL:
            killed.add(pid)
        outcomes.append(_check_export_dir(out, old, new, killed, f"run {i}"))
        if sig == signal.SIGINT:
            assert _leftovers(tmp_path, "ckpt") == [], f"run {i}: SIGINT must clean up"
    assert "old" in outcomes  # the signals did land before the end


def test_sigkill_at_every_write_point_of_scan_and_fix(tiny_llama_dir, tmp_path, calib_text, monkeypatch):
    import qdoctor.cli.fix_cmd as fix_cmd
    import qdoctor.policy.search as search_mod
    import qdoctor.report.html as html_mod

    cache: dict = {}
    monkeypatch.setattr(html_mod, "render_html", _memo(html_mod.render_html, cache, "html"))
    monkeypatch.setattr(search_mod, "search", _memo(search_mod.search, cache, "search"))
    monkeypatch.setattr(fix_cmd, "verify", _memo(fix_cmd.verify, cache, "verify"))
    js, html, recipe = tmp_path / "scan.json", tmp_path / "scan.html", tmp_path / "plan.yaml"
    for argv, files in ((_scan_argv(tiny_llama_dir, js, html, calib_text), (js, html)),
                        (_fix_argv(tiny_llama_dir, recipe, calib_text), (recipe,))):
        with inject(0) as counted:  # fills the memo caches the children inherit
            assert main(argv) == 0
        new = {f: f.read_text() for f in files}
        for k in range(1, counted.count + 1):
            for f in files:
                f.write_text("old")
            code, pid, log = _fork_run(argv, tmp_path / "log", "sigkill", k)
            assert code == -signal.SIGKILL, log
            for f in files:
                text = f.read_text()
                complete = (json.loads(text)["schema"] == "qdoctor.scan/1" if f.suffix == ".json" and text != "old"
                            else text == new[f])  # the JSON report has timings: complete = parses whole
                assert text == "old" or complete, f"{argv[0]}: SIGKILL at write {k}: {f.name} is partial"
            left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
            assert all(f".{pid}." in n for n in left), left
        assert main(argv) == 0  # removes the killed runs' temporaries
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_sigkill_of_a_fresh_interpreter(tiny_llama_dir, tmp_path, calib_text):
    """One real ``python`` process (no fork), SIGKILLed at a seeded write point of export."""
    out = tmp_path / "ckpt"
    _make_old_checkpoint(out)
    old = _dir_sig(out)
    k = random.Random(SEED).randint(2, 16)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, str(RUNNER), "sigkill", str(k), "--",
                        *_export_argv(tiny_llama_dir, out, calib_text)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert _dir_sig(out) == old


def _demo_argv(model, js, calib):
    return ["demo", "--model", str(model), "--limit", "1", "--seqlen", "32", "--calib-samples", "2",
            "--calib-seqlen", "16", "--calib-source", str(calib), "--json", str(js)]


def test_sigint_at_write_points_of_the_main_command(tiny_llama_dir, tmp_path, calib_text, monkeypatch):
    """The README's main command (``qdoctor demo``): its report is the old or the complete new one."""
    import qdoctor.cli.demo_cmd as demo_cmd

    real_table, cache = demo_cmd.run_table, {}
    monkeypatch.setattr(demo_cmd, "run_table", _memo(real_table, cache, "table"))
    js = tmp_path / "demo.json"
    with inject(0) as counted:
        assert main(_demo_argv(tiny_llama_dir, js, calib_text)) == 0
    assert counted.count >= 1
    for k in range(1, counted.count + 1):
        js.write_text("old json")
        with inject(k):
            assert main(_demo_argv(tiny_llama_dir, js, calib_text)) == 130
        j = js.read_text()
        assert j == "old json" or json.loads(j)["command"] == "demo", f"k={k}"
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], f"k={k}"
