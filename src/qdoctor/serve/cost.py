"""Inference cost of a plan, from measured GEMM times (``bench/gemm.py --json``), never invented.

The table is bench/gemm.py's JSON: ``rows`` of ``{"model", "layer", "M", "N", "K", "ms": {"graph":
{method: ms}, "eager": {...}}}`` measured on one GPU. qdoctor ships it as package data
(``qdoctor/data/gemm_costs.json``) when one has been measured; without it every cost is None and
reports say "no GEMM table".

Each linear layer runs one GEMM of shape (M tokens) × (K in) → (N out). Its time under a method
is read from the row of the nearest measured M (by |log M|) and the nearest measured shape (by
|log N·K|), scaled by the work ratio:

    t(method, M, N, K) = ms[method](M*, N*, K*) · (N·K) / (N*·K*)

and the plan's relative cost is Σ_layers t(method of the layer) / Σ_layers t(bf16) — its
estimated speed vs BF16 is the inverse. The method of a layer: BF16/FP16 kept or unquantized →
``bf16``; INT8 W8A8 per-tensor/per-channel weights → ``int8`` (per-token activation quantization
included; static per-tensor activations are timed the same); per-group INT8 W8A8 → ``int8 g128``
(any group size); FP8 W8A8 → ``fp8``; weight-only layers were not measured (cost None).
Attention, norms and memory traffic outside the GEMMs are not counted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from qdoctor.errors import QDoctorError
from qdoctor.quant.granularity import PerGroup
from qdoctor.quant.spec import LayerScheme

NO_TABLE = "no GEMM table"
DATA_FILE = "gemm_costs.json"
MODE = "graph"  # CUDA-graph replay: GPU time, as a serving stack with graphs sees it


def gemm_method(ls: LayerScheme | None) -> str | None:
    """The bench/gemm.py method that times a layer run as ``ls`` (see the module docstring)."""
    if ls is None or not ls.is_quantized:
        return "bf16"
    if ls.activations is None:
        return None
    if ls.weights.dtype == "fp8":
        return "fp8"
    return "int8 g128" if isinstance(ls.weights.granularity, PerGroup) else "int8"


@dataclass
class GemmTable:
    rows: list[dict]
    source: str = ""
    device: str = ""
    mode: str = MODE

    @classmethod
    def from_json(cls, data: dict, source: str = "") -> "GemmTable":
        rows = data.get("rows") if isinstance(data, dict) else None
        if not rows:
            raise QDoctorError(f"{source or 'GEMM table'}: no 'rows' (write it with bench/gemm.py --json)")
        info = data.get("info") or {}
        return cls(rows=list(rows), source=source, device=str(info.get("device") or info.get("gpu") or ""))

    @classmethod
    def load(cls, path: "str | Path") -> "GemmTable":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise QDoctorError(f"{path}: cannot read the GEMM table ({e})") from None
        return cls.from_json(data, str(path))

    @classmethod
    def shipped(cls) -> "GemmTable | None":
        """The table shipped with qdoctor (package data), or None when none has been measured."""
        f = resources.files("qdoctor").joinpath("data", DATA_FILE)
        if not f.is_file():
            return None
        return cls.from_json(json.loads(f.read_text(encoding="utf-8")), f"qdoctor/data/{DATA_FILE}")

    def time_ms(self, method: str, m: int, n: int, k: int) -> float | None:
        """``t(method, M, N, K)`` (module docstring); None when the method was never measured."""
        rows = [r for r in self.rows if method in (r.get("ms", {}).get(self.mode) or {})]
        if not rows:
            return None
        m_star = min({r["M"] for r in rows}, key=lambda x: abs(math.log(x / m)))
        at_m = [r for r in rows if r["M"] == m_star]
        row = min(at_m, key=lambda r: abs(math.log(r["N"] * r["K"] / (n * k))))
        return row["ms"][self.mode][method] * (n * k) / (row["N"] * row["K"])


@dataclass
class PlanCost:
    relative: float | None  # Σ t(plan) / Σ t(bf16); None: no table, or a layer's method not measured
    m: int
    why: str = ""
    per_method: dict = field(default_factory=dict)  # method → layer count

    @property
    def speedup(self) -> float | None:
        return None if self.relative is None else 1.0 / self.relative

    def text(self) -> str:
        if self.relative is None:
            return self.why
        return f"{self.speedup:.2f}× BF16 GEMM speed at M = {self.m}"

    def to_dict(self) -> dict:
        return {"relative_cost": self.relative, "speedup_vs_bf16": self.speedup, "M": self.m, "why": self.why,
                "methods": dict(self.per_method)}


def plan_cost(layers: dict, shapes: dict, table: GemmTable | None, m: int) -> PlanCost:
    """The cost of running every layer of ``layers`` (name → LayerScheme | None) with shapes
    ``shapes`` (name → (N, K)) for ``m`` tokens, relative to all of them in BF16."""
    counts: dict = {}
    for ls in layers.values():
        method = gemm_method(ls)
        counts[method or "weight-only"] = counts.get(method or "weight-only", 0) + 1
    if table is None:
        return PlanCost(None, m, NO_TABLE, counts)
    total = base = 0.0
    for name, ls in layers.items():
        n, k = shapes[name]
        method = gemm_method(ls)
        t = table.time_ms(method, m, n, k) if method else None
        t_bf16 = table.time_ms("bf16", m, n, k)
        if t is None or t_bf16 is None:
            return PlanCost(None, m, f"{method or 'weight-only'} not in the GEMM table", counts)
        total, base = total + t, base + t_bf16
    return PlanCost(total / base, m, "", counts)
