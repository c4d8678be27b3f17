"""Where an export goes: every check before any work, a staging directory next to the target,
one rename at the end.

A crash, a Ctrl-C or a failed check never leaves a half-written checkpoint: the files are
written into ``.<name>.tmp-XXXX`` beside ``<name>`` and renamed into place only once complete.
``overwrite`` replaces an existing checkpoint directory (one holding ``config.json``) or an
empty directory — never an arbitrary non-empty directory or a file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from qdoctor.errors import QDoctorError


def check_out_dir(path: "str | os.PathLike", overwrite: bool = False) -> Path:
    """Fail early, before any model work, when ``path`` cannot receive a checkpoint."""
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
        if any(p.iterdir()) and not (p / "config.json").is_file():
            raise QDoctorError(f"{path}: exists and is not a model checkpoint (no config.json); "
                               "refusing to replace it, even with --overwrite")
    return p


@contextmanager
def staged_dir(path: "str | os.PathLike", overwrite: bool = False):
    """Yield an empty staging directory; on success rename it to ``path``, else delete it."""
    target = check_out_dir(path, overwrite)
    try:
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    except OSError as e:
        raise QDoctorError(f"{path}: cannot create a staging directory in {target.parent} "
                           f"({e.strerror or e})") from None
    try:
        yield tmp
        _publish(tmp, path, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, path, target: Path, overwrite: bool) -> None:
    check_out_dir(path, overwrite)  # it may have appeared while we worked
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a model directory is normally shared
    for f in tmp.iterdir():  # some writers (safetensors via a temporary file) leave 0600
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)
    if not target.exists():
        os.rename(tmp, target)
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
