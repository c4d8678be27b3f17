"""A GGUF file checked before transformers reads it: magic, version, header, tensor data extent,
architecture.

transformers' GGUF loader (through ``gguf.GGUFReader``) answers a truncated or foreign file with
``struct.error``, a numpy reshape error or an "ignore_mismatched_sizes" report, and loads some
architectures qdoctor does not support (mamba, bert, …) before qdoctor could refuse them. This
module walks the header with bounds checks (it never evaluates anything it reads: metadata
strings, chat templates included, are only skipped over or decoded as text) and raises one
``QDoctorError`` that names the file and what is wrong.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from qdoctor.errors import QDoctorError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_COUNT = 1 << 24  # tensors / metadata keys / dims: far above any real model


class _Truncated(Exception):
    pass


class _Cursor:
    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, fmt: str):
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise _Truncated
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self) -> bytes:
        n = self.take("<Q")
        if self.pos + n > self.size:
            raise _Truncated
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s

    def skip_value(self, vtype: int, path: Path, key: str):
        """The value for scalars and strings (decoded as UTF-8 text, never interpreted); arrays are skipped."""
        if vtype in _SCALAR:
            return self.take(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string().decode("utf-8", errors="replace")
        if vtype == _ARRAY:
            itype, n = self.take("<I"), self.take("<Q")
            if itype in _SCALAR:
                step = struct.calcsize(_SCALAR[itype])
                if self.pos + n * step > self.size:
                    raise _Truncated
                self.pos += n * step
            elif itype == _STRING:
                if n > self.size:
                    raise _Truncated
                for _ in range(n):
                    m = self.take("<Q")
                    if self.pos + m > self.size:
                        raise _Truncated
                    self.pos += m
            else:
                raise QDoctorError(f"{path}: corrupted GGUF metadata (key {key!r} has an array of unknown type {itype})")
            return None
        raise QDoctorError(f"{path}: corrupted GGUF metadata (key {key!r} has unknown value type {vtype})")


def read_gguf_header(path: "str | Path") -> dict:
    """``{'version', 'architecture', 'n_tensors', 'metadata': {key: scalar or str}, 'data_end'}``;
    raises ``QDoctorError`` for anything but a complete GGUF v2/v3 file."""
    import gguf

    path = Path(path)
    size = path.stat().st_size
    if size < 24:
        with open(path, "rb") as f:
            head = f.read(4)
        if head != MAGIC:
            raise QDoctorError(f"{path}: not a GGUF file (bad magic {head!r}, expected b'GGUF')")
        raise QDoctorError(f"{path}: truncated GGUF file ({size} bytes, the header alone needs 24)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != MAGIC:
            raise QDoctorError(f"{path}: not a GGUF file (bad magic {bytes(buf[:4])!r}, expected b'GGUF')")
        c = _Cursor(buf, size)
        c.pos = 4
        try:
            version = c.take("<I")
            if version not in VERSIONS:
                raise QDoctorError(f"{path}: unsupported GGUF version {version} (supported: 2, 3)")
            n_tensors, n_kv = c.take("<Q"), c.take("<Q")
            if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
                raise QDoctorError(f"{path}: corrupted GGUF header ({n_tensors} tensors, {n_kv} metadata keys)")
            meta: dict = {}
            for _ in range(n_kv):
                key = c.string().decode("utf-8", errors="replace")
                meta[key] = c.skip_value(c.take("<I"), path, key)
            tensors = []
            for _ in range(n_tensors):
                name = c.string().decode("utf-8", errors="replace")
                n_dims = c.take("<I")
                if n_dims > 8:
                    raise QDoctorError(f"{path}: corrupted GGUF tensor info ({name!r} has {n_dims} dimensions)")
                dims = [c.take("<Q") for _ in range(n_dims)]
                ttype, offset = c.take("<I"), c.take("<Q")
                tensors.append((name, dims, ttype, offset))
        except _Truncated:
            raise QDoctorError(f"{path}: truncated GGUF file (the header ends past the file's {size} bytes)") from None
        header_end = c.pos
    align = meta.get("general.alignment") or 32
    if not isinstance(align, int) or align <= 0:
        raise QDoctorError(f"{path}: corrupted GGUF header (general.alignment = {align!r})")
    data_start = (header_end + align - 1) // align * align
    data_end = data_start
    for name, dims, ttype, offset in tensors:
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise QDoctorError(f"{path}: tensor {name!r} has unknown GGML type {ttype}") from None
        n = 1
        for d in dims:
            n *= d
        data_end = max(data_end, data_start + offset + n // block * type_size)
    if data_end > size:
        raise QDoctorError(f"{path}: truncated GGUF file (tensor data needs {data_end} bytes, the file has {size})")
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise QDoctorError(f"{path}: GGUF file without a general.architecture string")
    return {"version": version, "architecture": arch, "n_tensors": n_tensors, "metadata": meta, "data_end": data_end}


def check_gguf(path: "str | Path") -> str:
    """The file's architecture, once the header is complete and qdoctor supports it."""
    from qdoctor.models.registry import supported_model_types

    arch = read_gguf_header(path)["architecture"]
    supported = supported_model_types()
    if arch not in supported and f"{arch}_text" not in supported:
        raise QDoctorError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(supported)}")
    return arch
