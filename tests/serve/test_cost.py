"""The GEMM cost model: arithmetic checked by hand on a small synthetic table (a test fixture in
bench/gemm.py's JSON layout, not a shipped measurement)."""

import json
import math

import pytest

from qdoctor.errors import QDoctorError
from qdoctor.quant.spec import LayerScheme, QuantSpec
from qdoctor.quant.granularity import PerChannel, PerGroup, PerToken
from qdoctor.serve.cost import NO_TABLE, GemmTable, gemm_method, plan_cost


def row(m, n, k, **ms):
    return {"model": "t", "layer": "x", "M": m, "N": n, "K": k, "ms": {"graph": ms, "eager": {}}, "rel_err": {}}


TABLE = {"info": {"device": "synthetic"}, "rows": [
    row(256, 100, 200, **{"bf16": 1.0, "int8": 0.8, "int8 g128": 0.9, "fp8": 0.7}),
    row(256, 400, 800, **{"bf16": 10.0, "int8": 6.0, "int8 g128": 8.0, "fp8": 5.0}),
    row(2048, 100, 200, **{"bf16": 4.0, "int8": 2.0, "int8 g128": 3.0, "fp8": 2.5}),
    row(2048, 400, 800, **{"bf16": 40.0, "int8": 20.0, "int8 g128": 32.0, "fp8": 24.0}),
]}

INT8 = LayerScheme(QuantSpec("int8", PerChannel()), QuantSpec("int8", PerToken(), True))
G128 = LayerScheme(QuantSpec("int8", PerGroup(128)), QuantSpec("int8", PerToken(), True))
FP8 = LayerScheme(QuantSpec("fp8", PerChannel()), QuantSpec("fp8", PerToken(), True))
BF16 = LayerScheme(keep="bf16")


def test_methods():
    assert [gemm_method(x) for x in (INT8, G128, FP8, BF16, None)] == ["int8", "int8 g128", "fp8", "bf16", "bf16"]
    assert gemm_method(LayerScheme(QuantSpec("int8", PerChannel()))) is None  # weight-only: not measured


def test_plan_cost_by_hand():
    table = GemmTable.from_json(TABLE)
    layers = {"a": INT8, "b": BF16, "c": FP8, "d": G128}
    shapes = {"a": (100, 200), "b": (400, 700), "c": (50, 100), "d": (400, 800)}
    # M = 1000 is nearer 2048 than 256 on a log scale; b (N·K = 280000) is nearest the 320000 row,
    # c (5000) the 20000 row; times scale with N·K
    plan = 2.0 + 40.0 * 280000 / 320000 + 2.5 * 5000 / 20000 + 32.0
    bf16 = 4.0 + 40.0 * 280000 / 320000 + 4.0 * 5000 / 20000 + 40.0
    got = plan_cost(layers, shapes, table, 1000)
    assert got.relative == pytest.approx(plan / bf16, rel=1e-12)
    assert got.speedup == pytest.approx(bf16 / plan) and "× BF16" in got.text() and "M = 1000" in got.text()
    assert math.isclose(plan_cost(layers, shapes, table, 300).relative,
                        (0.8 + 10.0 * 0.875 + 0.7 * 0.25 + 8.0) / (1.0 + 10.0 * 0.875 + 1.0 * 0.25 + 10.0))


def test_no_table_never_invents():
    got = plan_cost({"a": INT8}, {"a": (100, 200)}, None, 2048)
    assert got.relative is None and got.text() == NO_TABLE
    wo = plan_cost({"a": LayerScheme(QuantSpec("int8", PerChannel()))}, {"a": (100, 200)},
                   GemmTable.from_json(TABLE), 2048)
    assert wo.relative is None and "weight-only" in wo.why


def test_table_file(tmp_path):
    p = tmp_path / "g.json"
    p.write_text(json.dumps(TABLE))
    assert GemmTable.load(p).device == "synthetic"
    p.write_text("{}")
    with pytest.raises(QDoctorError, match="rows"):
        GemmTable.load(p)
