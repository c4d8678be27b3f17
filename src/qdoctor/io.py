"""Atomic output: write to a temporary file in the target's directory, then rename.

A crash or a Ctrl-C never leaves a half-written file behind: the target holds either its old
content or the complete new one. A full or read-only disk is a ``QDoctorError`` naming the file
(nothing is written). A temporary left by a killed run (``kill -9``: no cleanup can run) carries
its process id, ``.<name>.<pid>.XXXX.tmp``, and is removed, with a note, by the next write of
the same file once that process is gone (``remove_stale``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from qdoctor.distributed import current_world
from qdoctor.errors import QDoctorError

# OSErrors that mean "this disk cannot take the output", not a bug.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}


def check_writable(path: str) -> Path:
    """Fail early (before long work) when the output's directory does not exist."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise QDoctorError(f"{path}: is a directory, expected a file path")
    if not p.parent.exists():
        raise QDoctorError(f"{path}: directory {p.parent} does not exist")
    return p


def disk_error(path, e: OSError, what: str = "cannot write") -> QDoctorError:
    return QDoctorError(f"{path}: {what} ({e.strerror or e}); nothing was written")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(target: Path, kind: str = "file") -> list[Path]:
    """Remove the temporaries of ``target`` left by runs that were killed (their pid is gone);
    returns what was removed. ``kind``: ``file`` (``atomic_write_*``) or ``dir`` (staged exports)."""
    if kind == "file":
        pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.[^.]+\.tmp$")
    else:
        pattern = re.compile(rf"^\.{re.escape(target.name)}\.(?:tmp|old)-(\d+)-[^.]+$")
    removed = []
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return removed
    for f in siblings:
        m = pattern.match(f.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        if ".old-" in f.name and not target.exists():  # an old checkpoint not yet restored: keep it
            continue
        try:
            if f.is_dir() and not f.is_symlink():
                shutil.rmtree(f)
            else:
                f.unlink()
        except OSError:
            print(f"qdoctor: note: cannot remove {f}, left by an interrupted run (pid {m.group(1)})",
                  file=sys.stderr)
            continue
        print(f"qdoctor: note: removed {f}, left by an interrupted run (pid {m.group(1)})", file=sys.stderr)
        removed.append(f)
    return removed


@contextmanager
def _staged_file(path: str):
    """(fd, temporary path) beside ``path``, readable as the umask allows (a report is shared like
    any file; mkstemp makes 0600); renamed onto ``path`` when the ``with`` ends normally, removed
    otherwise; a full or read-only disk is one line. On a rank other than 0 of a torchrun world
    (``qdoctor.distributed``) the file goes to a private temporary directory and is dropped:
    rank 0 alone writes outputs."""
    p = check_writable(path)
    if not current_world().is_main:
        with tempfile.TemporaryDirectory() as scratch:
            yield tempfile.mkstemp(dir=scratch)
        return
    remove_stale(p, "file")
    try:
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.{os.getpid()}.", suffix=".tmp")
    except OSError as e:
        if e.errno in DISK_ERRNOS:
            raise disk_error(path, e) from None
        raise
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        yield fd, tmp
        os.replace(tmp, p)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if e.errno in DISK_ERRNOS:
            raise disk_error(path, e) from None
        raise
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> Path:
    with _staged_file(path) as (fd, _tmp):
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path).expanduser()


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
    onto ``path`` when the ``with`` ends normally, removed otherwise (as ``atomic_write_bytes``)."""
    with _staged_file(path) as (fd, tmp):
        os.close(fd)
        yield tmp
