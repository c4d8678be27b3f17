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
