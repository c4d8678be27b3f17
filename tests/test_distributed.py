"""Data-parallel evaluation and calibration (``qdoctor.distributed``): two gloo ranks on the CPU
give what one process gives — bit for bit where each rank runs the very batches one process
runs (perplexity sums, calibration statistics), and per-item zero-shot log-likelihoods within
fp32 rounding (items are batched differently per shard)."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from qdoctor.calib.observers import LinearInputStats, seeded_generator
from qdoctor.distributed import World, shard_range, top_keys, world_from_env


@pytest.mark.parametrize("n,ws,align", [(0, 2, 1), (5, 2, 2), (7, 3, 1), (2, 4, 1), (10, 4, 3), (64, 8, 4)])
def test_shards_are_contiguous_disjoint_and_cover(n, ws, align):
    parts = [shard_range(n, r, ws, align) for r in range(ws)]
    covered = [i for a, b in parts for i in range(a, b)]
    assert covered == list(range(n))  # in order, each item once
    assert all(a % align == 0 for a, b in parts if b > a)  # whole batches
    sizes = [-(-(b - a) // align) for a, b in parts]  # units per rank: as numpy's array_split deals them
    units = -(-n // align)
    assert sizes == [units // ws + (1 if r < units % ws else 0) for r in range(ws)]


def test_top_keys_is_the_sort_by_key_then_position():
    keys = torch.tensor([0.5, 0.25, 0.5, 0.75, 0.25, 0.5, 0.0])
    brute = sorted(range(len(keys)), key=lambda i: (-float(keys[i]), i))[:4]
    assert top_keys(keys, 4).tolist() == sorted(brute)  # 0.75, then the first three 0.5s… of which 3 fit
    assert top_keys(keys, 10).tolist() == list(range(7))


def test_priority_sample_of_a_stream_equals_the_sample_of_its_shards():
    """Rows fed batch by batch to one recorder vs two recorders (row_offset) merged by top_keys:
    the same rows, ties included (keys quantized so that many are equal)."""
    torch.manual_seed(0)
    x = torch.randn(6, 8, 4)  # 6 windows of 8 tokens
    one = LinearInputStats(in_features=4, sample_rows=10, seed=5)
    for b in range(3):
        one.update(x[2 * b:2 * b + 2])
    parts = []
    for lo, hi in [(0, 4), (4, 6)]:
        st = LinearInputStats(in_features=4, sample_rows=10, seed=5, row_offset=lo * 8)
        for b in range(lo, hi, 2):
            st.update(x[b:b + 2])
        parts.append(st)
    keys = torch.cat([p._row_keys for p in parts])
    merged = torch.cat([p.rows for p in parts])[top_keys(keys, 10)]
    assert torch.equal(merged, one.rows)
    # a second derivation of the sample: the 10 largest of the generator's first 48 keys
    all_keys = torch.rand(48, generator=torch.Generator().manual_seed(5))
    assert torch.equal(one.rows, x.reshape(48, 4)[top_keys(all_keys, 10)])


def test_skipped_generator_continues_the_sequence():
    full = torch.rand(1000, generator=torch.Generator().manual_seed(9))
    assert torch.equal(torch.rand(300, generator=seeded_generator(9, skip=700)), full[700:])


def test_world_from_env():
    assert world_from_env({}) == World()
    assert not world_from_env({"WORLD_SIZE": "1"}).distributed
    w = world_from_env({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "QDOCTOR_DIST_BACKEND": "gloo"})
    assert (w.rank, w.world_size, w.backend, w.device.type, w.is_main) == (1, 2, "gloo", "cpu", False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(tiny_llama_dir, tmp_path):
    """Two ranks started as torchrun starts them, against one process run meanwhile: the
    library calls (``distributed_worker.compute``) and ``qdoctor eval --json`` (rank 0 writes,
    rank 1 prints nothing, the perplexities of full precision and a calibrated static scheme)."""
    import torch.multiprocessing as mp

    from distributed_worker import cli_args, compute, rank_main
    from qdoctor.cli import main

    from qdoctor.calib.text import wikitext_text

    ranks_dir, one_dir = tmp_path / "ranks", tmp_path / "one"
    ranks_dir.mkdir()
    one_dir.mkdir()
    text = tmp_path / "text.txt"
    text.write_text(wikitext_text("valid")[:20_000])
    ctx = mp.start_processes(rank_main, args=(2, _free_port(), str(tiny_llama_dir), str(text), str(ranks_dir)),
                             nprocs=2, join=False, start_method="spawn")
    ref = compute(str(tiny_llama_dir), World())
    assert main([*cli_args(str(tiny_llama_dir), str(text)), "--json", str(one_dir / "one.json")]) == 0
    while not ctx.join():
        pass
    got = torch.load(ranks_dir / "ranks.pt")
    assert got["nll_sum"] == ref["nll_sum"] and got["count"] == ref["count"]  # same additions: same bits
    assert got["layers"].keys() == ref["layers"].keys()
    for name, (ch, tok, rows) in ref["layers"].items():
        g_ch, g_tok, g_rows = got["layers"][name]
        assert torch.equal(g_ch, ch) and torch.equal(g_tok, tok), name
        assert rows.shape[0] == 24 and torch.equal(g_rows, rows), name
    for task, (metrics, lls, index) in ref["tasks"].items():
        g_metrics, g_lls, g_index = got["tasks"][task]
        assert g_index == index  # every item once, in item order
        # fp32 forwards of differently batched items: equal up to rounding, not bit for bit
        assert torch.allclose(torch.tensor(g_lls, dtype=torch.float64), torch.tensor(lls, dtype=torch.float64),
                              rtol=1e-5, atol=1e-5), task
        assert g_metrics.keys() == metrics.keys()
        for k in metrics:
            if k.startswith("acc"):
                assert g_metrics[k] == metrics[k], (task, k)
    one, two = (json.loads(p.read_text()) for p in (one_dir / "one.json", ranks_dir / "ranks.json"))
    assert [r["ppl"] for r in two["results"]] == [r["ppl"] for r in one["results"]]
    code0, out0 = (ranks_dir / "stdout-0.txt").read_text().split("\n", 1)
    code1, out1 = (ranks_dir / "stdout-1.txt").read_text().split("\n", 1)
    assert (code0, code1) == ("0", "0") and "WikiText-2 perplexity" in out0 and out1 == ""
    assert sorted(p.name for p in ranks_dir.iterdir()) == ["ranks.json", "ranks.pt", "stdout-0.txt",
                                                           "stdout-1.txt"]  # no temporaries left
