"""Peak device memory of each phase of the block-streamed plan search, on a Llama-3-70B-shaped model.

    python bench/fix_phases.py [--layers 4] [--calib-samples 64] [--windows 2] [--seqlen 1024]

The phases of ``policy.search.Searcher`` on a block-streamed model run one by one with the peak-memory counter
reset in between: the scan (calibration statistics and layer evidence in one streamed pass),
the FP held-out perplexity and one trial (every block quantized with the target scheme as it is read).
Printed per phase: seconds and the peak above the resident non-block tensors, in GiB and in
blocks. Random weights of the real shapes (``models.lazy.RandomSource``), real WikiText-2 text
(see bench/stream.py); a benchmark, never a test.
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=2, help="held-out windows")
    ap.add_argument("--seqlen", type=int, default=1024, help="held-out window length")
    args = ap.parse_args(argv)

    import torch
    from transformers import LlamaConfig

    from stream import SHAPES, word_tokenizer
    from qdoctor.calib.collect import CalibrationConfig
    from qdoctor.eval.perplexity import perplexity
    from qdoctor.models.lazy import RandomSource, load_lazy
    from qdoctor.models.registry import bos_token_id, get_blocks
    from qdoctor.policy.recipe import Recipe
    from qdoctor.policy.search import FixConfig, heldout_windows, resolve_target
    from qdoctor.scan.run import scan_with_stats

    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (peak device memory is what it measures)")
    shape = dict(SHAPES["70b"], num_hidden_layers=args.layers)
    config = LlamaConfig(**shape, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    tok = word_tokenizer(config.vocab_size)
    model = load_lazy(RandomSource(config, seed=0, outlier_blocks=2), dtype=torch.bfloat16, device="cuda")
    block_bytes = sum(p.numel() for p in get_blocks(model)[0].parameters()) * 2
    cfg = FixConfig(calibration=CalibrationConfig(n_samples=args.calib_samples, seqlen=args.calib_seqlen, seed=0,
                                                  sample_rows=512, holdout_fraction=0.2),
                    eval_windows=args.windows, eval_seqlen=args.seqlen)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    print(f"70B shapes, {args.layers} blocks; resident non-block tensors {base / 2**30:.2f} GiB, "
          f"one block {block_bytes / 2**30:.2f} GiB", flush=True)
    state: dict = {}

    def phase(name, fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        above = torch.cuda.max_memory_allocated() - base
        print(f"{name:28s} {time.perf_counter() - t:6.1f} s   peak above resident {above / 2**30:5.2f} GiB "
              f"= {above / block_bytes:.2f} blocks", flush=True)

    target = resolve_target(cfg.target)
    phase("scan (calibration + evidence)",
          lambda: state.update(stats=scan_with_stats(model, tok, cfg.scan_config(progress=False))[1]))
    state["windows"] = heldout_windows(tok, cfg, bos_token_id(model, tok))
    phase("FP held-out perplexity", lambda: perplexity(model, tok, windows=state["windows"], progress=False))
    phase(f"one trial ({cfg.target})", lambda: Recipe(scheme=target).perplexity(
        model, tok, state["windows"], state["stats"]))


if __name__ == "__main__":
    main()
