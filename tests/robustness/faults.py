"""Fault injection at the points where qdoctor touches the disk.

``inject(k, action)`` patches the write-side file operations (``open`` for writing, ``mkstemp``/
``mkdtemp``, ``os.replace``/``rename``, ``fsync``, ``chmod``, the export's safetensors shard writer,
the staging exchange) so that the k-th such call (1-based) first performs ``action``:
``"interrupt"`` raises ``KeyboardInterrupt`` (what a SIGINT delivers), ``"sigint"`` sends a real
SIGINT to this process, ``"sigkill"`` a real SIGKILL (no cleanup can run). ``k = 0`` only counts.

Run as a script it executes ``qdoctor`` under injection: ``python faults.py ACTION K -- ARGV…``.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import signal
import sys
import tempfile
from pathlib import Path

WRITE_MODES = set("wax+")


class Injector:
    def __init__(self, k: int, action: str):
        self.k, self.action, self.count, self.events = k, action, 0, []

    def hit(self, what: str) -> None:
        self.count += 1
        self.events.append(what)
        if self.count != self.k:
            return
        if self.action == "interrupt":
            raise KeyboardInterrupt
        if self.action == "sigint":
            os.kill(os.getpid(), signal.SIGINT)
            # the handler raises KeyboardInterrupt at the next bytecode
        elif self.action == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def inject(k: int = 0, action: str = "interrupt"):
    import qdoctor.export.checkpoint as ck
    import qdoctor.export.staging as staging

    inj = Injector(k, action)
    real = {"open": builtins.open, "mkstemp": tempfile.mkstemp, "mkdtemp": tempfile.mkdtemp,
            "replace": os.replace, "rename": os.rename, "fsync": os.fsync, "chmod": os.chmod,
            "save": ck.save_file, "exchange": staging._exchange}

    def wrap(name, fn):
        def f(*a, **kw):
            inj.hit(name)
            return fn(*a, **kw)
        return f

    def open_(file, mode="r", *a, **kw):
        if WRITE_MODES & set(mode) and not isinstance(file, int):
            inj.hit("open")
        return real["open"](file, mode, *a, **kw)

    builtins.open = io.open = open_
    tempfile.mkstemp, tempfile.mkdtemp = wrap("mkstemp", real["mkstemp"]), wrap("mkdtemp", real["mkdtemp"])
    os.replace, os.rename = wrap("replace", real["replace"]), wrap("rename", real["rename"])
    os.fsync, os.chmod = wrap("fsync", real["fsync"]), wrap("chmod", real["chmod"])
    ck.save_file = wrap("safetensors", real["save"])  # the shard writer's
    staging._exchange = wrap("exchange", real["exchange"])
    try:
        yield inj
    finally:
        builtins.open = io.open = real["open"]
        tempfile.mkstemp, tempfile.mkdtemp = real["mkstemp"], real["mkdtemp"]
        os.replace, os.rename, os.fsync, os.chmod = real["replace"], real["rename"], real["fsync"], real["chmod"]
        ck.save_file = real["save"]
        staging._exchange = real["exchange"]


if __name__ == "__main__":  # python faults.py ACTION K -- qdoctor-argv…
    action, k = sys.argv[1], int(sys.argv[2])
    argv = sys.argv[sys.argv.index("--") + 1:]
    from qdoctor.cli import main

    with inject(k, action) as inj:
        Path(f"started-{os.getpid()}").touch()  # for the parent's wall-clock signals (cwd: its tmp dir)
        code = main(argv)
    print(f"events={inj.count}", file=sys.stderr)
    sys.exit(code)
