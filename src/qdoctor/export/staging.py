"""Where an export goes: every check before any work, a staging directory next to the target,
one rename at the end.

A crash, a Ctrl-C or a failed check never leaves a half-written checkpoint: the files are
written into ``.<name>.tmp-XXXX`` beside ``<name>`` and renamed into place only once complete.
``overwrite`` replaces an existing checkpoint directory (one holding ``config.json``) or an
empty directory — never an arbitrary non-empty directory or a file. The replacement is one
atomic exchange of the two directories (Linux ``renameat2(RENAME_EXCHANGE)``), so even a
``kill -9`` leaves the old checkpoint or the new one at ``<name>``; elsewhere two renames, and a
run killed between them leaves ``.<name>.old-<pid>-XXXX``, which the next export restores.

A full or read-only disk while writing is a ``QDoctorError`` (the staging directory is removed).
Staging directories carry the process id (``.<name>.tmp-<pid>-XXXX``); those of killed runs are
removed, with a note, by the next export to the same target (``io.remove_stale``).
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from qdoctor.errors import QDoctorError
from qdoctor.io import DISK_ERRNOS, disk_error, remove_stale


def check_out_dir(path: "str | os.PathLike", overwrite: bool = False, marker: str = "config.json") -> Path:
    """Fail early, before any model work, when ``path`` cannot receive a checkpoint.

    ``marker``: the file whose presence makes an existing directory replaceable with ``overwrite``
    (``config.json`` for a checkpoint; ``qdoctor doctor`` passes its own ``doctor.json``)."""
    p = Path(path).expanduser().absolute()
    parent = p.parent
    if not parent.exists():
        raise QDoctorError(f"{path}: directory {parent} does not exist")
    if not parent.is_dir():
        raise QDoctorError(f"{path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QDoctorError(f"{path}: cannot write in {parent} (permission denied)")
    if p.exists() or p.is_symlink():
        if not overwrite:
            raise QDoctorError(f"{path}: already exists; pass --overwrite (overwrite=True) to replace it")
        if p.is_symlink() or not p.is_dir():
            raise QDoctorError(f"{path}: exists and is not a directory; refusing to replace it")
        if any(p.iterdir()) and not (p / marker).is_file():
            what = "a model checkpoint" if marker == "config.json" else "an output of this command"
            raise QDoctorError(f"{path}: exists and is not {what} (no {marker}); "
                               "refusing to replace it, even with --overwrite")
    return p


def _restore_interrupted_swap(target: Path, marker: str = "config.json") -> None:
    """A run killed between the two renames of a fallback replace left ``.<name>.old-<pid>-X``
    and no ``<name>``: put the old checkpoint back."""
    if target.exists() or target.is_symlink():
        return
    pat = re.compile(rf"^\.{re.escape(target.name)}\.old-(\d+)-[^.]+$")
    olds = [f for f in target.parent.iterdir() if pat.match(f.name) and (f / marker).is_file()]
    if len(olds) == 1:
        os.rename(olds[0], target)
        print(f"qdoctor: note: restored {target} from {olds[0].name}, left by an interrupted run", file=sys.stderr)


@contextmanager
def staged_dir(path: "str | os.PathLike", overwrite: bool = False, marker: str = "config.json"):
    """Yield an empty staging directory; on success rename it to ``path``, else delete it
    (``marker``: as ``check_out_dir``)."""
    target = Path(path).expanduser().absolute()
    if target.parent.is_dir():
        _restore_interrupted_swap(target, marker)
        remove_stale(target, "dir")
    target = check_out_dir(path, overwrite, marker)
    try:
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-{os.getpid()}-"))
    except OSError as e:
        raise QDoctorError(f"{path}: cannot create a staging directory in {target.parent} "
                           f"({e.strerror or e})") from None
    try:
        yield tmp
        _publish(tmp, path, target, overwrite, marker)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in DISK_ERRNOS:
            raise disk_error(path, e, "cannot write the checkpoint") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries (Linux renameat2); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL / ENOSYS / EOPNOTSUPP: the filesystem cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def _publish(tmp: Path, path, target: Path, overwrite: bool, marker: str = "config.json") -> None:
    check_out_dir(path, overwrite, marker)  # it may have appeared while we worked
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a model directory is normally shared
    for f in tmp.iterdir():  # some writers (safetensors via a temporary file) leave 0600
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)
    if not target.exists():
        os.rename(tmp, target)
        return
    if _exchange(tmp, target):  # tmp now holds the old checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-{os.getpid()}-"))
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
