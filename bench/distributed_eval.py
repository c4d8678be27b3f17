"""Zero-shot evaluation of a resident Llama-3-8B-shaped random model, one or several GPUs.

    python bench/distributed_eval.py                                  # one GPU
    torchrun --nproc-per-node 2 bench/distributed_eval.py             # data-parallel: a replica per GPU
    python bench/distributed_eval.py --shape tiny --device cpu --limit 8   # a smoke run anywhere

Every rank builds the same seeded random model (``bench/stream.py``'s shapes, bf16) on its
GPU, and ``qdoctor.eval.zeroshot.evaluate`` scores a contiguous shard of each task's items
(``qdoctor.distributed``); rank 0 prints the wall time of the evaluation and the accuracies,
which must not depend on the number of GPUs (the per-item log-likelihoods are gathered; only
the batching of items differs, i.e. bf16 rounding). Accuracies of a random model mean nothing
beyond that comparison. Text is tokenized by ``bench/stream.py``'s word-level tokenizer.
"""

from __future__ import annotations

import argparse
import json
import time

from stream import SHAPES, word_tokenizer


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--tasks", default="piqa,arc_easy,hellaswag,lambada_openai")
    ap.add_argument("--limit", type=int, default=400, help="first N items of each task")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qdoctor.distributed import init_world, shutdown_world
    from qdoctor.eval.zeroshot import evaluate
    from qdoctor.io import atomic_write_json

    world = init_world()  # one process without torchrun
    device = world.device if world.distributed else torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    config = LlamaConfig(**SHAPES[args.shape], tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    config._attn_implementation = "sdpa"
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)  # the same weights on every rank
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    tok = word_tokenizer(config.vocab_size)
    load_s = time.perf_counter() - t0
    world.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    results = evaluate(model, tok, tasks=args.tasks.split(","), limit=args.limit, batch_size=args.batch_size,
                       progress=world.is_main, world=world)
    world.barrier()
    eval_s = time.perf_counter() - t1
    out = {"shape": args.shape, "dtype": args.dtype, "world_size": world.world_size,
           "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
           "build_seconds": round(load_s, 1), "eval_seconds": round(eval_s, 2),
           "items": {t: r.n_items for t, r in results.items()},
           "metrics": {t: {k: v for k, v in r.metrics.items() if not k.endswith("_stderr")} for t, r in results.items()}}
    if device.type == "cuda":
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if world.is_main:
        print(json.dumps(out, indent=1), flush=True)
    if args.json:
        atomic_write_json(args.json, out)
    shutdown_world()


if __name__ == "__main__":
    main()
