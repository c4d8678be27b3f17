"""Task data files: reading JSONL (plain or gzip'd), locating shipped files, choosing items.

Every record is one JSON object per line. A record that does not fit its task's schema
raises ``TaskDataError`` naming the file and the 1-based line number, so a user's own
file fails with one line that says where to look.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterator
from pathlib import Path

from qdoctor.errors import QDoctorError

SHIPPED_DIR = Path(__file__).resolve().parents[2] / "data" / "tasks"
SUFFIXES = (".jsonl", ".jsonl.gz")


class TaskDataError(QDoctorError):
    """A task data file is missing or a record in it does not fit the task's schema."""

    def __init__(self, path: "str | Path", line: int | None, message: str):
        self.path, self.line = str(path), line
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


def read_jsonl(path: "str | Path") -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for each non-blank line; ``.gz`` files are decompressed."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TaskDataError(path, lineno, f"not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(record, dict):
                    raise TaskDataError(path, lineno, f"expected a JSON object, got {type(record).__name__}")
                yield lineno, record
    except FileNotFoundError:
        raise TaskDataError(path, None, "no such file") from None
    except (OSError, UnicodeDecodeError) as e:  # bad gzip stream, not UTF-8, ...
        raise TaskDataError(path, None, f"cannot read ({e})") from None


def find_task_file(task: str, data_dir: "str | Path | None" = None) -> Path:
    """``<data_dir>/<task>.jsonl[.gz]`` when ``data_dir`` is given, else the shipped file."""
    folder = Path(data_dir).expanduser() if data_dir is not None else SHIPPED_DIR
    for suffix in SUFFIXES:
        candidate = folder / f"{task}{suffix}"
        if candidate.is_file():
            return candidate
    names = " or ".join(f"{task}{s}" for s in SUFFIXES)
    raise TaskDataError(folder, None, f"no data file for task {task!r} (looked for {names})")


def choose_indices(total: int, limit: int | None = None, subsample: int | None = None, seed: int = 1234) -> list[int]:
    """Which items to score: all, the first ``limit``, or ``subsample`` drawn at random with ``seed``.

    The random draw depends only on (total, subsample, seed), so the same items come back on
    every run and every machine; they are returned in file order.
    """
    if limit is not None and subsample is not None:
        raise QDoctorError("give either limit (first N items) or subsample (N random items), not both")
    for name, value in (("limit", limit), ("subsample", subsample)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise QDoctorError(f"{name} must be a positive integer, got {value!r}")
    if limit is not None:
        return list(range(min(limit, total)))
    if subsample is not None and subsample < total:
        return sorted(random.Random(seed).sample(range(total), subsample))
    return list(range(total))
