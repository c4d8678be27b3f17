"""Text sources: the shipped WikiText-2 splits and user text files.

``wikitext_text(split)`` rebuilds the Hugging Face rows of the raw file (a non-blank line →
``line + "\\n"``, a blank line → ``""``) and joins them with ``"\\n\\n"``, which is the
GPTQ/SmoothQuant perplexity recipe on ``Salesforce/wikitext`` (see data/wikitext2/LICENSE.md).
Calibration uses the validation split ("calib"), never the test split.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from qdoctor.errors import QDoctorError

SPLITS = {"test": "wiki.test.raw", "valid": "wiki.valid.raw"}
CALIBRATION_SPLIT = "valid"  # WikiText-2 train is not shipped; valid is disjoint from test


def _raw(split: str) -> str:
    if split not in SPLITS:
        raise QDoctorError(f"unknown WikiText-2 split {split!r}; shipped: {', '.join(SPLITS)}")
    return files("qdoctor").joinpath("data", "wikitext2", SPLITS[split]).read_text(encoding="utf-8")


def wikitext_text(split: str = "test") -> str:
    rows = [line + "\n" if line.strip() else "" for line in _raw(split).split("\n")[:-1]]
    return "\n\n".join(rows)


def read_text_file(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise QDoctorError(f"{path}: no such text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QDoctorError(f"{path}: not UTF-8 text") from None
    if not text.strip():
        raise QDoctorError(f"{path}: the file is empty" if not text else f"{path}: the file holds only whitespace")
    check_looks_like_text(text, path)
    return text


_TEXT_CONTROLS = {"\t", "\n", "\r", "\f", "\v"}


def check_looks_like_text(text: str, path: str) -> None:
    """Refuse UTF-8 that is really binary data: NUL bytes, or more than 1% control characters."""
    nul = text.find("\x00")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        raise QDoctorError(f"{path}:{line}: holds a NUL byte; this looks like a binary file, not text")
    sample = text[:1_000_000]
    controls = sum(1 for ch in sample if ch < " " and ch not in _TEXT_CONTROLS)
    if controls > 0.01 * len(sample):
        raise QDoctorError(f"{path}: {controls} control characters in {len(sample)}; this looks like a binary "
                           "file, not text")


def text_source(name: str) -> str:
    """``wikitext2:test``, ``wikitext2:valid`` (or plain ``test``/``valid``), or a path to a text file."""
    if name.startswith("wikitext2:"):
        return wikitext_text(name.split(":", 1)[1])
    if name in SPLITS:
        return wikitext_text(name)
    return read_text_file(name)
