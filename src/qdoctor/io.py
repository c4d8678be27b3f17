"""Atomic output: write to a temporary file in the target's directory, then rename.

A crash or a Ctrl-C never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from qdoctor.errors import QDoctorError


def check_writable(path: str) -> Path:
    """Fail early (before long work) when the output's directory does not exist."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise QDoctorError(f"{path}: is a directory, expected a file path")
    if not p.parent.exists():
        raise QDoctorError(f"{path}: directory {p.parent} does not exist")
    return p


def atomic_write_bytes(path: str, data: bytes) -> Path:
    p = check_writable(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def atomic_write_text(path: str, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@contextmanager
def atomic_path(path: str):
    """A temporary path beside ``path`` for a writer that wants a file name (safetensors); renamed
    onto ``path`` when the ``with`` ends normally, removed otherwise."""
    p = check_writable(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
