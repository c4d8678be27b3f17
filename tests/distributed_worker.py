"""What one rank computes in tests/test_distributed.py: the same function runs in one process
(world of 1, the reference) and in each of two gloo ranks (``torch.multiprocessing.spawn``)."""

from __future__ import annotations

import contextlib
import io
import os

import torch

from qdoctor.cli import main
from qdoctor.calib.collect import collect_linear_stats
from qdoctor.distributed import World, init_world, shutdown_world
from qdoctor.eval.perplexity import window_nll
from qdoctor.eval.zeroshot import evaluate
from qdoctor.models.loading import load
from qdoctor.models.registry import block_linear_names

# 5 windows in batches of 2: three batches, so two ranks get unequal shards (4 and 1 windows)
N_WINDOWS, SEQLEN, BATCH, SAMPLE_ROWS = 5, 16, 2, 24
TASKS, LIMIT = ["piqa", "lambada_openai"], 5


def compute(model_dir: str, world: World) -> dict:
    """Perplexity sums, calibration statistics and zero-shot results of the tiny model."""
    model, tok = load(model_dir, dtype="fp32", device="cpu")
    g = torch.Generator().manual_seed(11)
    windows = torch.randint(3, 512, (N_WINDOWS, SEQLEN), generator=g)
    nll_sum, count = window_nll(model, windows, batch_size=BATCH, world=world)
    stats = collect_linear_stats(model, windows, block_linear_names(model), batch_size=BATCH,
                                 sample_rows=SAMPLE_ROWS, seed=3, world=world)
    layers = {name: (st.channel_absmax, st.token_absmax, st.rows) for name, st in stats.items()}
    zs = evaluate(model, tok, tasks=TASKS, limit=LIMIT, batch_size=4, progress=False, world=world)
    tasks = {t: (r.metrics, [it.loglikelihoods for it in r.items], [it.index for it in r.items])
             for t, r in zs.items()}
    return {"nll_sum": nll_sum, "count": count, "layers": layers, "tasks": tasks}


def cli_args(model_dir: str, text: str) -> list[str]:
    """``qdoctor eval``: full precision and a calibrated static scheme, perplexity of 3 windows
    (``text``: a short file, evaluated and calibrated on, to keep tokenization cheap)."""
    return ["eval", "--model", model_dir, "--device", "cpu", "--scheme", "w8a8-channel-tensor-static",
            "--seqlen", "32", "--limit", "3", "--text", text, "--calib-source", text,
            "--calib-samples", "3", "--calib-seqlen", "32"]


def rank_main(rank: int, world_size: int, port: int, model_dir: str, text: str, out_dir: str) -> None:
    """``torch.multiprocessing.spawn`` entry, as torchrun would start it (its environment
    variables): join a gloo group, ``compute`` (rank 0 saves it), then the CLI with ``--json``
    (rank 0 writes it); each rank saves what it printed on stdout."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), QDOCTOR_DIST_BACKEND="gloo")
    torch.set_num_threads(1)
    world = init_world()
    try:
        result = compute(model_dir, world)
        if world.is_main:
            torch.save(result, os.path.join(out_dir, "ranks.pt"))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = main([*cli_args(model_dir, text), "--json", os.path.join(out_dir, "ranks.json")])  # ends the group
        with open(os.path.join(out_dir, f"stdout-{rank}.txt"), "w") as f:
            f.write(f"{code}\n{printed.getvalue()}")
    finally:
        shutdown_world()
