"""``load(source)``: a model and its tokenizer from a built-in name, a GGUF file, a
Hugging Face directory (safetensors, sharded or not) or a hub id.

Security defaults: safetensors/GGUF only (``use_safetensors=True``; a directory holding only
pickled ``.bin`` weights is refused), ``trust_remote_code`` off unless asked for.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from qdoctor.errors import QDoctorError
from qdoctor.models.builtin import BUILTINS, builtin_gguf_path
from qdoctor.models.device import default_device
from qdoctor.models.lazy import load_lazy
from qdoctor.models.registry import arch_for_model_type

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_dtype(dtype: "str | torch.dtype | None", device: str) -> torch.dtype:
    """fp32 on CPU, bf16 on GPU, unless given."""
    if dtype is None:
        return torch.float32 if device == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise QDoctorError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16") from None


def describe_source(source: str) -> dict:
    """Classify a source string: {'kind': builtin|gguf|hf_dir|hub, 'path':…, 'gguf_file':…}."""
    if source in BUILTINS:
        p = builtin_gguf_path(source)
        return {"kind": "builtin", "path": str(p.parent), "gguf_file": p.name}
    p = Path(source).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise QDoctorError(f"{source}: not a model (expected a .gguf file or a model directory)")
        return {"kind": "gguf", "path": str(p.parent), "gguf_file": p.name}
    if p.is_dir():
        if (p / "config.json").is_file():
            if not any(p.glob("*.safetensors")):
                if any(p.glob("*.bin")) or any(p.glob("*.pt")):
                    raise QDoctorError(f"{source}: only pickled weights (.bin/.pt) found; qdoctor loads "
                                       "safetensors or GGUF only (convert with save_pretrained(safe_serialization=True))")
                raise QDoctorError(f"{source}: config.json found but no *.safetensors weights")
            return {"kind": "hf_dir", "path": str(p), "gguf_file": None}
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return {"kind": "gguf", "path": str(p), "gguf_file": ggufs[0].name}
        if len(ggufs) > 1:
            raise QDoctorError(f"{source}: several .gguf files; pass one file: {', '.join(g.name for g in ggufs)}")
        raise QDoctorError(f"{source}: not a model directory (no config.json + safetensors, no .gguf)")
    if _HUB_ID.match(source) and not source.startswith((".", "/", "~")):
        return {"kind": "hub", "path": source, "gguf_file": None}
    raise QDoctorError(f"{source}: no such file or directory, and not a built-in model "
                       f"({', '.join(BUILTINS)}) or a hub id (org/name)")


def load(source: str, dtype: "str | torch.dtype | None" = None, device: str | None = None,
         trust_remote_code: bool = False, device_map: "str | dict | None" = None, stream: bool = False):
    """Load ``(model, tokenizer)``; the model is in eval mode on ``device``.

    ``source``: built-in name (``smollm2-135m``, ``gemma3-270m``), a ``.gguf`` file, a Hugging
    Face directory with config.json + safetensors, or a hub id (needs network).
    ``device_map``: an accelerate device map (``"auto"``, ``"balanced"``, or a dict) to spread
    the model over several GPUs instead of moving it to ``device``.
    ``stream``: a lazy model (``models.lazy``): decoder blocks are read one at a time from the
    safetensors checkpoint by the streamed entry points (scan, calibrate, perplexity, fix).
    Raises ``QDoctorError`` with one clear line for anything a user can get wrong, including
    an architecture missing from the registry.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    info = describe_source(source)
    if stream:
        return _load_streamed(source, info, torch_dtype, device, trust_remote_code)
    kwargs = {"trust_remote_code": trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if info["gguf_file"]:
        kwargs["gguf_file"] = info["gguf_file"]
    else:
        # Check the architecture before reading gigabytes of weights.
        try:
            cfg = AutoConfig.from_pretrained(info["path"], **kwargs)
        except (OSError, ValueError) as e:
            raise QDoctorError(f"{source}: cannot read the model config ({_first_line(e)})") from None
        arch_for_model_type(_text_model_type(cfg))
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            info["path"], dtype=torch_dtype,
            use_safetensors=None if info["gguf_file"] else True, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(info["path"], **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise QDoctorError(f"{source}: could not load the model ({_first_line(e)})") from None
    arch_for_model_type(_text_model_type(model.config))
    if device_map is None:
        model.to(device)
    model.eval()
    model.qdoctor_source = source
    return model, tokenizer


def _text_model_type(config) -> str:
    return getattr(config, "model_type", "<unknown>")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _load_streamed(source: str, info: dict, dtype: torch.dtype, device: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if info["gguf_file"] or not Path(info["path"]).is_dir():
        raise QDoctorError(f"{source}: --stream reads a local Hugging Face directory with safetensors "
                           "(download it first, e.g. with `huggingface-cli download`)")
    model = load_lazy(info["path"], dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(info["path"], trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise QDoctorError(f"{source}: could not load the tokenizer ({_first_line(e)})") from None
    model.qdoctor_source = source
    return model, tokenizer
