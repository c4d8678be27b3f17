"""Lazy models: the decoder's skeleton in memory, its blocks read one at a time.

A Llama-3-70B checkpoint is 141 GB of bf16; one of its 80 decoder blocks is 1.7 GB.
``load_lazy(source)`` builds the model with every block parameter on the ``meta`` device
(no memory), loads only the non-block tensors (embeddings, final norm, LM head) onto the
device, and attaches a ``LazyBlocks`` to the model. ``models.streaming.stream_blocks`` (and so
scan, calibration, perplexity and the plan search) then materializes block i from its source
just before it runs and drops it right after:

    device memory ≈ non-block tensors + one block + the calibration activations
    host memory   ≈ one block's tensors in flight (safetensors are memory-mapped)

Sources (``config``, ``name in source``, ``tensors(names, device, dtype, shapes)``):

- ``SafetensorsSource`` — a Hugging Face directory (one ``*.safetensors`` file or shards
  with ``model.safetensors.index.json``), read through safetensors' memory-mapped
  ``safe_open``; only the requested tensors are touched.
- ``RandomSource`` — seeded random weights of a config's real shapes, generated per tensor
  on the device (benchmarks: a 70B-shaped model without a 140 GB file). Optionally plants
  Qin-style weight outliers (|w| up to ``outlier_value`` in a few input dimensions of the
  first blocks' q/k/v/gate/up projections).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from accelerate.utils import set_module_tensor_to_device

from qdoctor.errors import QDoctorError
from qdoctor.models.device import default_device
from qdoctor.models.registry import arch_for, arch_for_model_type, get_blocks
from qdoctor.quant.linear import QuantLinear, clear_input_transforms


class SafetensorsSource:
    """Tensors of a safetensors checkpoint directory, read on demand (memory-mapped)."""

    def __init__(self, path: str | Path, trust_remote_code: bool = False):
        from transformers import AutoConfig

        from qdoctor.models.loading import check_config_json, safetensors_files

        self.path = Path(path)
        if not self.path.is_dir():
            raise QDoctorError(f"{path}: not a directory with config.json and *.safetensors")
        if not (self.path / "config.json").is_file():
            raise QDoctorError(f"{path}: no config.json")
        check_config_json(self.path, trust_remote_code)  # as data, before transformers sees it
        try:
            self.config = AutoConfig.from_pretrained(str(self.path), trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise QDoctorError(f"{path}: cannot read the model config ({str(e).splitlines()[0]})") from None
        # tensor name → file; every header checked (truncation, corruption), index shards inside the directory
        self.files: dict[str, Path] = safetensors_files(self.path)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def tensors(self, names: list[str], device, dtype: torch.dtype,
                shapes: dict | None = None) -> dict[str, torch.Tensor]:
        """The named tensors on ``device`` in ``dtype`` (``shapes``: unused, the file has them);
        a tensor holding NaN/Inf is refused by name."""
        from safetensors import SafetensorError, safe_open

        from qdoctor.models.loading import check_finite_tensor

        missing = [n for n in names if n not in self.files]
        if missing:
            raise QDoctorError(f"{self.path}: checkpoint has no tensor {missing[0]!r}")
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for f, ns in by_file.items():
            try:
                with safe_open(str(f), framework="pt", device="cpu") as h:
                    for n in ns:
                        t = h.get_tensor(n)
                        check_finite_tensor(t, n, f)
                        out[n] = t.to(device=device, dtype=dtype, non_blocking=False)
            except (SafetensorError, OSError) as e:  # the file changed or vanished since it was checked
                raise QDoctorError(f"{f}: cannot read tensors ({str(e).strip().splitlines()[0]})") from None
        return out


@dataclass
class RandomSource:
    """Seeded random weights with a config's real shapes, generated tensor by tensor.

    Linear and embedding weights ~ N(0, std²) (``config.initializer_range``, default 0.02);
    norm weights are 1 (``0`` for the ``(1 + w)`` RMSNorm of Gemma). Each tensor's generator
    is seeded from (seed, name), so block i is the same whenever it is generated. With
    ``outlier_blocks`` > 0, blocks 0..outlier_blocks-1 get ``outlier_dims`` input dimensions in
    which ``outlier_rows`` output rows of q/k/v/gate/up hold ±``outlier_value`` (Qin, 2408.15301)."""

    config: object
    seed: int = 0
    outlier_blocks: int = 0
    outlier_dims: int = 4
    outlier_rows: int = 16
    outlier_value: float = 96.0  # Qin: "above 90"
    _offset: float = field(init=False, default=0.0)

    def __post_init__(self):
        self._offset = arch_for_model_type(self.config.model_type).norm_offset

    def __contains__(self, name: str) -> bool:
        return True

    def _generator(self, name: str, device) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed((self.seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
        return g

    def tensor(self, name: str, shape: tuple, device, dtype: torch.dtype) -> torch.Tensor:
        if len(shape) == 1:  # norm weights (x̂ · (offset + w) = x̂), biases 0
            value = 1.0 - self._offset if "norm" in name.rsplit(".", 2)[-2] else 0.0
            return torch.full(shape, value, device=device, dtype=dtype)
        std = float(getattr(self.config, "initializer_range", 0.02))
        w = torch.empty(shape, device=device, dtype=torch.float32)
        w.normal_(0.0, std, generator=self._generator(name, device))
        self._plant(name, w)
        return w.to(dtype)

    def _plant(self, name: str, w: torch.Tensor) -> None:
        parts = name.split(".")
        if self.outlier_blocks <= 0 or "layers" not in parts:
            return
        block = int(parts[parts.index("layers") + 1])
        if block >= self.outlier_blocks or not any(p in name for p in ("q_proj", "k_proj", "v_proj", "gate_proj",
                                                                        "up_proj")):
            return
        g = torch.Generator(device=w.device)
        g.manual_seed(self.seed + 7919 * block)  # the same dims for every consumer of the block's norm
        dims = torch.randperm(w.shape[1], generator=g, device=w.device)[: self.outlier_dims]
        g2 = self._generator(name + "#outliers", w.device)
        rows = torch.randperm(w.shape[0], generator=g2, device=w.device)[: self.outlier_rows]
        signs = torch.randint(0, 2, (rows.numel(), dims.numel()), generator=g2, device=w.device) * 2 - 1
        w[rows[:, None], dims[None, :]] = signs.to(w.dtype) * self.outlier_value

    def tensors(self, names: list[str], device, dtype: torch.dtype, shapes: dict | None = None) -> dict:
        if shapes is None:
            raise QDoctorError("RandomSource needs the tensor shapes (LazyBlocks passes them)")
        return {n: self.tensor(n, tuple(shapes[n]), device, dtype) for n in names}


@dataclass
class LazyBlocks:
    """The block source of a lazy model (``models.streaming.block_source``): materializes decoder
    blocks of a meta-device skeleton from a source, one at a time; transient by nature."""

    resident = False  # class attribute: the blocks are not all in memory
    source: object
    device: torch.device
    dtype: torch.dtype
    prefix: str  # dotted path of the blocks' ModuleList, e.g. "model.layers"
    loads: int = 0  # blocks materialized so far (for reports)

    def load(self, model: nn.Module, i: int) -> nn.Module:
        block = get_blocks(model)[i]
        params = {f"{self.prefix}.{i}.{n}": p for n, p in block.named_parameters()}
        tensors = self.source.tensors(list(params), self.device, self.dtype, {n: p.shape for n, p in params.items()})
        for name, t in tensors.items():
            if tuple(t.shape) != tuple(params[name].shape):
                raise QDoctorError(f"tensor {name!r} has shape {tuple(t.shape)}, the config expects "
                                   f"{tuple(params[name].shape)}")
            set_module_tensor_to_device(model, name, self.device, value=t, clear_cache=False)
        self.loads += 1
        return block

    def release(self, model: nn.Module, i: int) -> None:
        """Back to meta: quantized layers are replaced by meta ``nn.Linear``s of the same shape."""
        block = get_blocks(model)[i]
        clear_input_transforms(block)  # an online rotation is re-made with the block, never kept
        for name, m in list(block.named_modules()):
            if isinstance(m, QuantLinear):
                lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta",
                                dtype=self.dtype)
                parent, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent) if parent else block, child, lin)
        block.to("meta")


def is_lazy(model) -> bool:
    return getattr(model, "qdoctor_lazy", None) is not None


def load_lazy(source: "str | Path | SafetensorsSource | RandomSource", dtype: torch.dtype = torch.bfloat16,
              device: str | None = None, trust_remote_code: bool = False) -> nn.Module:
    """A model whose decoder blocks stay on ``meta`` until ``stream_blocks`` needs them.

    ``source``: a safetensors checkpoint directory, or a ``SafetensorsSource``/``RandomSource``.
    The returned model is not runnable with ``model(...)``; use the streamed entry points
    (``qdoctor.scan``, ``calibrate``, ``perplexity``, the plan search), which detect it."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    if not isinstance(source, (SafetensorsSource, RandomSource)):
        source = SafetensorsSource(source, trust_remote_code=trust_remote_code)
    device = torch.device(device or default_device())
    config = source.config
    arch = arch_for_model_type(config.model_type)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa",
                                                 trust_remote_code=trust_remote_code)
    model.eval()
    prefix = arch.blocks
    rest = {n: p for n, p in model.named_parameters() if not n.startswith(prefix + ".")}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    names = [n for n in rest if n in source or not (tied and n.endswith("lm_head.weight"))]
    tensors = source.tensors(names, device, dtype, {n: p.shape for n, p in rest.items()})
    for name, t in tensors.items():
        set_module_tensor_to_device(model, name, device, value=t)
    if tied:
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefix + ".")]
    if still_meta:
        raise QDoctorError(f"checkpoint is missing {still_meta[0]!r}")
    for m in model.modules():  # buffers (rotary frequencies) were built on the CPU
        for k, b in list(m._buffers.items()):
            if b is not None and not b.is_meta:
                m._buffers[k] = b.to(device)
    model.qdoctor_lazy = LazyBlocks(source, device, dtype, prefix)
    model.qdoctor_source = str(getattr(source, "path", type(source).__name__))
    arch_for(model)
    return model


def final_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head applied to the last block's output: final norm, head, and Gemma's soft-cap
    ``c · tanh(logits / c)`` when the config sets ``final_logit_softcapping``."""
    arch = arch_for(model)
    base = model.get_submodule(arch.blocks.rpartition(".")[0])
    logits = model.get_output_embeddings()(base.norm(hidden))
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits
