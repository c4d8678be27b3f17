"""``load(source)``: a model and its tokenizer from a built-in name, a GGUF file, a
Hugging Face directory (safetensors, sharded or not) or a hub id.

Security defaults: safetensors/GGUF only (``use_safetensors=True``; a directory holding only
pickled ``.bin`` weights is refused before transformers is called, so nothing is unpickled),
``trust_remote_code`` off unless asked for (a config whose architecture needs its own code is
refused before transformers could import it).

Checks before any weights are read (each a one-line ``QDoctorError`` naming the file): every
safetensors file's header (truncated, corrupted, header length past the end of the file), the
shard index (shards missing, or named outside the model directory), config.json (valid JSON, a
supported ``model_type``), and a GGUF file's header, tensor extent and architecture
(``models.gguf_check``). After loading, every parameter must be finite (NaN/Inf name the tensor).
"""

from __future__ import annotations

import json
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
        from qdoctor.models.gguf_check import check_gguf

        check_gguf(Path(info["path"]) / info["gguf_file"])
    else:
        if info["kind"] == "hf_dir":
            check_config_json(info["path"], trust_remote_code)
            safetensors_files(info["path"])
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
    check_finite_parameters(model, source)
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


def check_config_json(path: "str | Path", trust_remote_code: bool = False) -> dict:
    """config.json of a model directory, read as data: valid JSON, a ``model_type`` qdoctor
    supports, and no architecture that needs model-provided code (``auto_map``) unless
    ``trust_remote_code``. Nothing is imported or executed."""
    from qdoctor.models.registry import supported_model_types

    f = Path(path) / "config.json"
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise QDoctorError(f"{f}: not valid JSON ({_first_line(e)})") from None
    if not isinstance(cfg, dict):
        raise QDoctorError(f"{f}: expected a JSON object")
    model_type = cfg.get("model_type")
    supported = supported_model_types()
    if cfg.get("auto_map") and model_type not in supported and not trust_remote_code:
        raise QDoctorError(f"{path}: the model needs its own code (config.json auto_map, model_type "
                           f"{model_type!r}); qdoctor runs no model-provided code unless you pass --trust-remote-code "
                           "(trust_remote_code=True) after reading it")
    if not trust_remote_code:
        if not isinstance(model_type, str):
            raise QDoctorError(f"{f}: no model_type; qdoctor supports {', '.join(supported)}")
        try:
            arch_for_model_type(model_type)
        except QDoctorError as e:  # "unsupported architecture …; supported: …"
            raise QDoctorError(f"{f}: {e}") from None
    return cfg


_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
                "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_ST_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


def check_safetensors_file(f: "str | Path") -> list[str]:
    """The tensor names of a safetensors file whose header is intact and whose data is all
    there; ``QDoctorError`` naming the file for a truncated or corrupted one (read: the 8-byte
    header length and the JSON header; the tensor data is not touched)."""
    from safetensors import SafetensorError, safe_open

    f = Path(f)
    size = f.stat().st_size
    with open(f, "rb") as h:
        head = h.read(8)
        if len(head) < 8:
            raise QDoctorError(f"{f}: truncated safetensors file ({size} bytes, not even a header length)")
        n = int.from_bytes(head, "little")
        if n > _ST_MAX_HEADER or 8 + n > size:
            raise QDoctorError(f"{f}: truncated or corrupted safetensors file (header length {n} bytes, "
                               f"the file has {size})")
        raw = h.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise QDoctorError(f"{f}: corrupted safetensors header (not a JSON object: {_first_line(e)})") from None
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            a, b = (int(x) for x in entry["data_offsets"])
            numel = 1
            for d in entry["shape"]:
                numel *= int(d)
            itemsize = _ST_ITEMSIZE.get(entry["dtype"])
        except (TypeError, KeyError, ValueError):
            raise QDoctorError(f"{f}: corrupted safetensors header (entry of tensor {name!r})") from None
        if a < 0 or b < a or (itemsize is not None and b - a != numel * itemsize):
            raise QDoctorError(f"{f}: corrupted safetensors header (tensor {name!r}: offsets {a}..{b} do not fit "
                               f"its dtype and shape)")
        end = max(end, b)
    if 8 + n + end > size:
        raise QDoctorError(f"{f}: truncated safetensors file (its tensors need {8 + n + end} bytes, the file has "
                           f"{size}; re-download or re-save it)")
    try:
        with safe_open(str(f), framework="pt") as h:  # safetensors' own validation (overlaps, gaps)
            return list(h.keys())
    except SafetensorError as e:
        raise QDoctorError(f"{f}: not a valid safetensors file ({_first_line(e)})") from None


def safetensors_files(path: "str | Path") -> dict[str, Path]:
    """Tensor name → file of a model directory, every file checked (``check_safetensors_file``).
    With ``model.safetensors.index.json`` the index decides; its shard names must be plain
    files inside the directory (no ``..``, no absolute paths) and must all exist."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not a mapping")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise QDoctorError(f"{index}: not a safetensors index ({_first_line(e)})") from None
        root = path.resolve()
        files: dict[str, Path] = {}
        for name, shard in weight_map.items():
            p = (path / str(shard))
            if Path(str(shard)).is_absolute() or p.resolve().parent != root:
                raise QDoctorError(f"{index}: shard {str(shard)!r} of tensor {name!r} is outside the model "
                                   f"directory; refusing to read it")
            files[name] = p
        missing = sorted({f.name for f in files.values() if not f.is_file()})
        if missing:
            raise QDoctorError(f"{path}: shard(s) listed in {index.name} are missing: {', '.join(missing[:3])}"
                               + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""))
        for f in sorted(set(files.values())):
            present = set(check_safetensors_file(f))
            absent = [n for n, g in files.items() if g == f and n not in present]
            if absent:
                raise QDoctorError(f"{f}: the index lists tensor {absent[0]!r} in this shard, but it is not there")
        return files
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise QDoctorError(f"{path}: no *.safetensors files")
    files = {}
    for f in shards:
        files.update({k: f for k in check_safetensors_file(f)})
    return files


def check_finite_parameters(model, source: str) -> None:
    """Every floating-point parameter finite; else name the first tensor holding NaN/Inf."""
    for name, p in model.named_parameters():
        if not p.is_meta:
            check_finite_tensor(p, name, source)


def check_finite_tensor(t: torch.Tensor, name: str, where) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise QDoctorError(f"{where}: weight {name!r} holds {bad} NaN/Inf value(s) (corrupted checkpoint?); "
                           "refusing to calibrate or quantize it")


def check_context(model, seqlen: int, what: str) -> None:
    """``seqlen`` must fit the model's context (``max_position_embeddings``)."""
    cfg = getattr(model, "config", None)
    ctx = getattr(cfg, "max_position_embeddings", None) or getattr(getattr(cfg, "text_config", None),
                                                                   "max_position_embeddings", None)
    if isinstance(ctx, int) and ctx > 0 and seqlen > ctx:
        raise QDoctorError(f"{what} {seqlen} is longer than the model's context ({ctx} tokens, "
                           "max_position_embeddings); use at most that")
