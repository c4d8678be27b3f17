"""Several processes, one model replica each: data-parallel evaluation and calibration.

Launched by ``torchrun --nproc-per-node N -m qdoctor …`` every process (rank) loads the model,
takes a contiguous shard of the work (windows, items) and the ranks combine their results
exactly, so the answer is the one a single process gives:

- sums (NLL, token and item counts) are gathered as the per-batch terms, in window order, and
  added in that order on every rank — the same floating-point additions as one process, so the
  same bits (never a mean of means);
- maxima (channel absmax) are an ``all_reduce`` with MAX (exact in any order);
- per-token maxima and per-item results are gathered in rank order = window / item order;
- sampled rows (priority sampling, ``calib.observers``) carry their keys; each rank draws the
  keys of *its* global rows (``LinearInputStats.row_offset``) and the global sample is the top
  ``sample_rows`` keys of the gathered candidates (``top_keys``: ties to the earlier row).

Shards are whole batches (``shard_range(..., align=batch_size)``), so every batch a rank runs is
a batch one process would run: activations, and so every statistic, are identical.

Without torchrun (no ``WORLD_SIZE`` in the environment, or 1) the world is one process, no
process group is made and every helper is the identity: zero cost for normal use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from qdoctor.errors import QDoctorError


def shard_range(n: int, rank: int, world_size: int, align: int = 1) -> tuple[int, int]:
    """[start, end) of rank ``rank``'s contiguous share of ``range(n)`` in units of ``align``
    items: U = ⌈n / align⌉ units, rank r gets ⌊U / W⌋ units plus one when r < U mod W, in rank
    order; unit u covers items [u · align, min((u + 1) · align, n)). Deterministic, disjoint,
    covering; a rank may get nothing when U < W."""
    if align < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise QDoctorError(f"bad shard request: rank {rank} of {world_size}, align {align}")
    units = -(-n // align)
    per, extra = divmod(units, world_size)
    first = rank * per + min(rank, extra)
    last = first + per + (1 if rank < extra else 0)
    return min(first * align, n), min(last * align, n)


def top_keys(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Positions (ascending) of the ``k`` largest ``keys``; equal keys go to the earlier position.

    The order (key descending, position ascending) is total, so keeping the top k of a stream
    batch by batch, or of each rank's part and then of their union, gives the same set."""
    if keys.numel() <= k:
        return torch.arange(keys.numel())
    return torch.sort(keys, descending=True, stable=True).indices[:k].sort().values


@dataclass(frozen=True)
class World:
    """The processes of one run: this one's ``rank`` among ``world_size``, its ``device`` (the
    local GPU under NCCL, else the CPU) and the process group's ``backend`` (None: one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints and writes outputs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int, align: int = 1) -> slice:
        """This rank's ``slice`` of ``range(n)`` (``shard_range``)."""
        return slice(*shard_range(n, self.rank, self.world_size, align))

    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(self.device).contiguous()

    def all_max(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum over ranks (exact), on ``t``'s device and dtype."""
        if not self.distributed:
            return t
        buf = self._comm(t)
        dist.all_reduce(buf, op=dist.ReduceOp.MAX)
        return buf.to(t.device)

    def gather(self, obj: Any) -> list:
        """``[obj of rank 0, obj of rank 1, …]`` on every rank (picklable objects; tensors come
        back on the CPU)."""
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def concat(self, items: list) -> list:
        """Every rank's ``items`` joined in rank order (= the unsharded order for ``shard``)."""
        if not self.distributed:
            return items
        return [x for part in self.gather(items) for x in part]

    def barrier(self) -> None:
        if self.distributed:
                dist.barrier()


def world_from_env(env: "dict[str, str] | None" = None) -> World:
    """The ``World`` torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); one process
    when ``WORLD_SIZE`` is absent or 1. NCCL with GPU ``LOCAL_RANK`` when CUDA has a GPU for
    every local rank, else gloo on the CPU."""
    env = os.environ if env is None else env
    try:
        size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
        local_size = int(env.get("LOCAL_WORLD_SIZE", str(size)))
    except ValueError:
        raise QDoctorError("torchrun's RANK / WORLD_SIZE / LOCAL_RANK are not integers") from None
    if size <= 1:
        return World()
    if env.get("QDOCTOR_DIST_BACKEND", "") not in ("", "nccl", "gloo"):
        raise QDoctorError("QDOCTOR_DIST_BACKEND must be nccl or gloo")
    want = env.get("QDOCTOR_DIST_BACKEND") or None
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if want == "nccl" or (want is None and gpus >= local_size):
        if gpus < local_size:
            raise QDoctorError(f"NCCL needs one GPU per local rank: {local_size} ranks, {gpus} GPUs visible")
        return World(rank, size, local, torch.device("cuda", local), "nccl")
    return World(rank, size, local, torch.device("cpu"), "gloo")


_CURRENT: list[World] = [World()]


def current_world() -> World:
    """The world of this process: ``init_world``'s, else one process."""
    return _CURRENT[0]


def init_world(world: World | None = None) -> World:
    """Join the process group of ``world`` (default ``world_from_env()``) and make it current.
    One process: nothing is initialized. A GPU world selects the local GPU, so ``cuda`` means it."""
    world = world or world_from_env()
    if world.distributed:
        if world.device.type == "cuda":
            torch.cuda.set_device(world.device)
        if not dist.is_initialized():
            kw = {"device_id": world.device} if world.backend == "nccl" else {}
            dist.init_process_group(world.backend, rank=world.rank, world_size=world.world_size, **kw)
    _CURRENT[0] = world
    return world


def shutdown_world() -> None:
    """Leave the process group (after a final barrier) and fall back to one process."""
    world = _CURRENT[0]
    if world.distributed:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    _CURRENT[0] = World()
