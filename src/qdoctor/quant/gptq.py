"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): round a linear layer's weight W (N × K) column by column, each
rounding error compensated on the columns not yet rounded, so that the layer's output on the
calibration inputs X (n × K) moves as little as possible:

    minimise ‖X Wᵀ − X Ŵᵀ‖²  over Ŵ on the quantization grid,   H = 2 XᵀX / n   (§3, "OBQ")

With H⁻¹ = Uᵀ U (U upper triangular: the Cholesky factor of the damped inverse Hessian,
§4 "Cholesky reformulation"), column j is rounded and the remaining columns absorb its error:

    q_j = D(Q(w_j; s_j)),   e_j = (w_j − q_j) / U_jj,   W[:, j+1:] −= e_j · U[j, j+1:]

which equals the OBS update W[:, F] −= (w_j − q_j) / [H_F⁻¹]_jj · [H_F⁻¹]_{j,F} with the inverse
Hessian of the not-yet-rounded columns F downdated after every column (the test's reference).

- dampening (§4 "numerical stability"): H + λI with λ = dampening · mean(diag H) (default 1 %);
- dead columns (H_jj = 0: an input channel that is always zero) get H_jj = 1 and w_j = 0 — any
  weight there gives the same output, and 0 is on every grid;
- lazy batch updates (§4 "lazy batch-updates"): the columns are processed in blocks of
  ``block_size``; inside a block the updates are rank-1 on the block only, and the rest of W
  receives the block's errors in one matrix product (same result, memory-bound → compute-bound);
- act-order (the authors' ``--act-order``): columns processed by descending diag H (the most
  active input channels first), Ŵ un-permuted afterwards;
- the grid: Q/D are qdoctor's own (``quant.fake``: INT8 ±127 round-half-even, FP8 E4M3), with
  the scale ``s`` computed once, before any update, from the original W exactly as ``QuantLinear``
  computes it (``quant.fake.compute_scale``: per-tensor, per-channel or per-group absmax / qmax) —
  so GPTQ changes which grid point each weight takes, never the grid. Per-group with act-order:
  every column keeps the scale of its *original* group (llm-compressor's ``actorder: weight``),
  so the checkpoint needs no ``g_idx`` and vLLM's ordinary per-group kernels serve it.

Precision: XᵀX is accumulated in fp32 (``HessianAccumulator``); the dampening, the Cholesky
factorisations and the inverse run in fp64 (K = 28672 for a 70B down_proj: fp32 Cholesky of
a badly conditioned H fails where fp64 does not); the column updates run in fp32.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from qdoctor.errors import QDoctorError
from qdoctor.quant.fake import FAKE_QUANTIZERS, compute_scale
from qdoctor.quant.granularity import PerChannel, PerGroup, PerTensor
from qdoctor.quant.scales import group_view
from qdoctor.quant.spec import QuantSpec

_KEYS = ("dampening", "act_order", "block_size", "propagate")


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ as a recipe step (``gptq:`` in a recipe file)::

        gptq: {dampening: 0.01, act_order: false, block_size: 128, propagate: false}

    dampening: λ = dampening · mean(diag H) added to diag H (0 < dampening ≤ 1).
    act_order: process columns by descending diag H.
    block_size: columns per lazy batch update (a speed knob: the result does not depend on it).
    propagate: calibrate block i + 1 on the outputs of the *quantized* block i (error
        propagation, llm-compressor's sequential pipeline); False: on the full-precision outputs.
    """

    dampening: float = 0.01
    act_order: bool = False
    block_size: int = 128
    propagate: bool = False

    def __post_init__(self):
        if isinstance(self.dampening, bool) or not isinstance(self.dampening, (int, float)) \
                or not 0.0 < float(self.dampening) <= 1.0:
            raise QDoctorError(f"gptq dampening must be a number in (0, 1], got {self.dampening!r}")
        for key in ("act_order", "propagate"):
            if not isinstance(getattr(self, key), bool):
                raise QDoctorError(f"gptq {key} must be true or false, got {getattr(self, key)!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise QDoctorError(f"gptq block_size must be a positive integer, got {self.block_size!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: "dict | None") -> "GPTQConfig":
        d = {} if d is None else d
        if not isinstance(d, dict):
            raise QDoctorError(f"gptq must be a mapping of {', '.join(_KEYS)}, got {type(d).__name__}")
        unknown = set(d) - set(_KEYS)
        if unknown:
            raise QDoctorError(f"unknown key(s) in gptq: {', '.join(sorted(map(str, unknown)))}")
        return cls(**d)


@dataclass
class HessianAccumulator:
    """The running sum Σ xᵀx (fp32, K × K) and row count n of one linear input; mergeable
    (sums over batches or ranks add up). ``hessian()`` = H = 2 Σ xᵀx / n."""

    in_features: int
    xtx: "torch.Tensor | None" = None
    count: int = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold the rows of ``x`` (..., K) in."""
        rows = x.detach().reshape(-1, self.in_features).float()
        if self.xtx is None:
            self.xtx = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=rows.device)
        self.xtx.addmm_(rows.T, rows.to(self.xtx.device))
        self.count += rows.shape[0]

    def merge(self, other: "HessianAccumulator") -> "HessianAccumulator":
        if other.in_features != self.in_features:
            raise QDoctorError(f"cannot merge Hessians of {other.in_features} and {self.in_features} inputs")
        if other.xtx is not None:
            self.xtx = other.xtx.clone() if self.xtx is None else self.xtx + other.xtx.to(self.xtx.device)
        self.count += other.count
        return self

    def hessian(self) -> torch.Tensor:
        if self.count == 0 or self.xtx is None:
            raise QDoctorError("no calibration inputs reached this layer: cannot compute its Hessian")
        return self.xtx * (2.0 / self.count)


def column_scales(scale: torch.Tensor, spec: QuantSpec, shape: tuple[int, int]) -> torch.Tensor:
    """The scale of every weight element, (N, K): a per-tensor scalar, a per-channel (N, 1) or a
    per-group (N, K/g, 1) scale spread over the columns it covers."""
    n, k = shape
    g = spec.granularity
    if isinstance(g, PerGroup):
        return scale.reshape(n, k // g.group_size).repeat_interleave(g.group_size, dim=1)
    if isinstance(g, (PerTensor, PerChannel)):
        return scale.float().reshape(-1, 1).expand(n, k)
    raise QDoctorError(f"GPTQ quantizes weights per tensor, channel or group, not {g!r}")


def inverse_hessian_factor(H: torch.Tensor, dampening: float) -> torch.Tensor:
    """U (fp32, upper triangular) with Uᵀ U = (H + λI)⁻¹, λ = dampening · mean(diag H), in fp64."""
    h = H.double()
    h = h + torch.eye(h.shape[0], dtype=h.dtype, device=h.device) * (dampening * torch.diagonal(h).mean())
    L, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        L, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if int(info) != 0:
        raise QDoctorError(f"GPTQ: the damped Hessian is not positive definite (dampening {dampening}); "
                           "raise gptq.dampening or calibrate on more tokens")
    return L.float()


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None,
                  config: GPTQConfig = GPTQConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """(Ŵ, scale): Ŵ (fp32, W's shape) on the grid of ``spec`` with ``scale`` (default: the scale
    ``QuantLinear`` computes from W), chosen by GPTQ for the Hessian ``H`` (K × K) — see the
    module docstring for the formula. ``fake_quantize(Ŵ, spec, scale) == Ŵ``."""
    return gptq_quantize_shared([W], H, [spec], [scale], config)[0]


@torch.no_grad()
def gptq_quantize_shared(weights: list[torch.Tensor], H: torch.Tensor, specs: list[QuantSpec],
                         scales: "list[torch.Tensor | None] | None" = None,
                         config: GPTQConfig = GPTQConfig()) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``gptq_quantize`` of several layers that read the same input (q/k/v, gate/up: one H), in one
    factorisation and one column loop: the update ``W[:, j+1:] −= e_j · U[j, j+1:]`` acts on each
    row by itself (e_j is per row, U is shared), so stacking the layers' rows [W₁; W₂; …] and
    running the loop once gives every layer exactly its own result. Rows of one quantized dtype
    are stacked together (the rounding differs between INT8 and FP8). Returns [(Ŵᵢ, scaleᵢ)]."""
    scales = list(scales) if scales is not None else [None] * len(weights)
    if not (len(weights) == len(specs) == len(scales)) or not weights:
        raise QDoctorError(f"GPTQ needs one spec and scale per weight, got {len(weights)} weights, "
                           f"{len(specs)} specs, {len(scales)} scales")
    for W in weights:
        if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
            raise QDoctorError(f"GPTQ needs W (N, K) and H (K, K), got {tuple(W.shape)} and {tuple(H.shape)}")
    scales = [compute_scale(W, spec) if s is None else s for W, spec, s in zip(weights, specs, scales)]
    device = weights[0].device
    H = H.to(device).float().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    perm = torch.argsort(torch.diagonal(H), descending=True) if config.act_order else None
    if perm is not None:
        H = H[perm][:, perm]
    U = inverse_hessian_factor(H, config.dampening)
    del H
    out: list = [None] * len(weights)
    for dtype in dict.fromkeys(spec.dtype for spec in specs):
        idx = [i for i, spec in enumerate(specs) if spec.dtype == dtype]
        w = torch.cat([weights[i].detach().float() for i in idx]).to(device)
        s = torch.cat([column_scales(scales[i].to(device), specs[i], tuple(weights[i].shape)) for i in idx])
        w[:, dead] = 0.0
        if perm is not None:
            w, s = w[:, perm], s[:, perm]
        q = _round_columns(w, s, U, FAKE_QUANTIZERS[dtype], config.block_size)
        if perm is not None:
            q = q[:, torch.argsort(perm)]
        rows = 0
        for i in idx:
            n = weights[i].shape[0]
            out[i] = (q[rows:rows + n], scales[i])
            rows += n
    return out


def _round_columns(w: torch.Tensor, s: torch.Tensor, U: torch.Tensor, fq, block_size: int) -> torch.Tensor:
    """The GPTQ column loop (module docstring) over w (N × K, consumed) with elementwise scales s
    and the inverse-Hessian factor U, in lazy blocks of ``block_size`` columns; returns Ŵ."""
    k = w.shape[1]
    q = torch.empty_like(w)
    for a in range(0, k, block_size):
        b = min(a + block_size, k)
        w1, u1, s1 = w[:, a:b].clone(), U[a:b, a:b], s[:, a:b]
        q1 = q[:, a:b]
        err1 = torch.empty_like(w1)
        with _one_cpu_thread(w.device):
            for j in range(b - a):
                col = w1[:, j]
                qc = fq(col, s1[:, j])
                q1[:, j] = qc
                e = (col - qc) / u1[j, j]
                w1[:, j + 1:].addr_(e, u1[j, j + 1:], alpha=-1.0)
                err1[:, j] = e
        w[:, b:] -= err1 @ U[a:b, b:]  # the lazy batch update of the columns after the block
    return q


@contextmanager
def _one_cpu_thread(device: torch.device):
    """One intra-op thread on CPU for the column loop: its ops are small (N × ≤ block_size), and
    waking a thread pool for each costs more than the op — on a busy 2-core machine a 1536 × 576
    layer took 33 s with 2 threads and 1.0 s with 1 (same result). The block updates keep them all."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def dequantize_codes(codes: torch.Tensor, spec: QuantSpec, scale: torch.Tensor) -> torch.Tensor:
    """D(q) = q · s in fp32 for int8/fp8 codes (N, K) and a ``compute_scale``-shaped scale —
    the same numbers as ``fake_quantize`` (the stored form of a GPTQ weight is its codes)."""
    if isinstance(spec.granularity, PerGroup):
        return (group_view(codes.float(), spec.granularity.group_size) * scale).reshape(codes.shape)
    return codes.float() * scale
