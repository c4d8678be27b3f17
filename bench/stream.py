"""Block-streamed scan (and plan search) of a Llama-3-70B-shaped model, end to end.

    python bench/stream.py                          # 70B shapes, 80 blocks, scan 64 x 512 on cuda
    python bench/stream.py --fix --fix-calib 16     # then the plan search (block-streamed fix)
    python bench/stream.py --layers 8 --export       # then the block-streamed export (W8A8 static, scan's statistics)
    python bench/stream.py --shape tiny --device cpu --fix --export   # a smoke run anywhere
    torchrun --nproc-per-node 2 bench/stream.py --no-scan --fix --fix-calib 16   # the search on 2 GPUs

Under torchrun (``qdoctor.distributed``) each rank streams the blocks on its own GPU and takes
a shard of the calibration and held-out windows; rank 0 prints and writes the JSON.

The weights are random (``models.lazy.RandomSource``: N(0, 0.02²), norms 1, Qin-style ±90
outliers planted in a few input dimensions of blocks 0-1's q/k/v/gate/up) and generated block
by block on the device, so no 140 GB file is needed and the host never holds the model. The
text is real (WikiText-2 valid, tokenized word-level into the first ids of the 128k vocab), so
the pipeline is the one a user runs; accuracy numbers of a random model mean nothing and are
not reported — this measures time and memory. Printed: wall time of each phase, peak device
memory (``torch.cuda.max_memory_allocated``) against one block's bytes, the resident non-block
tensors (embeddings + LM head) and the calibration activations, and the peak host RSS.
"""

from __future__ import annotations

import argparse
import json
import time

SHAPES = {
    # Llama-3-70B / -8B (config.json of meta-llama/Meta-Llama-3-*), and a tiny smoke shape
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
}


def word_tokenizer(vocab_size: int):
    """A real word-level tokenizer over WikiText-2 valid (ids < vocab_size; <unk> for the rest)."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from qdoctor.calib.text import wikitext_text

    counts = Counter(wikitext_text("valid").split())
    specials = ["<bos>", "<eos>", "<unk>"]
    words = [w for w, _ in counts.most_common(vocab_size - len(specials))]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="70b")
    ap.add_argument("--layers", type=int, default=None, help="number of blocks (default: the shape's)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--fix", action="store_true", help="also run the block-streamed plan search")
    ap.add_argument("--fix-calib", type=int, default=64, help="calibration samples of the search")
    ap.add_argument("--fix-windows", type=int, default=2, help="held-out windows scoring each plan")
    ap.add_argument("--fix-seqlen", type=int, default=1024, help="held-out window length")
    ap.add_argument("--no-scan", action="store_true", help="skip the scan (e.g. to time only the export)")
    ap.add_argument("--cost-m", type=int, default=8192, help="tokens at which the plan's GEMM cost is estimated")
    ap.add_argument("--gemm-table", default=None, help="bench/gemm.py --json output (default: the shipped table)")
    ap.add_argument("--export", action="store_true",
                    help="also export the model block by block: w8a8-channel-tensor-static with the scan's "
                         "statistics (with --no-scan: w8a8-channel-token, which needs none)")
    ap.add_argument("--export-dir", default=None, help="where to write the export (default: a temporary directory, "
                                                       "deleted after its size is measured)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch
    from transformers import LlamaConfig

    from qdoctor.calib.collect import CalibrationConfig
    from qdoctor.distributed import init_world, shutdown_world
    from qdoctor.io import atomic_write_json, peak_rss_mb
    from qdoctor.models.lazy import RandomSource, load_lazy
    from qdoctor.models.registry import get_blocks
    from qdoctor.scan import ScanConfig, scan_with_stats

    world = init_world()  # one process without torchrun
    if world.distributed:
        args.device = str(world.device)
    show = print if world.is_main else (lambda *a, **k: None)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    config = LlamaConfig(**shape, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    cuda = args.device.startswith("cuda")
    out: dict = {"shape": args.shape, "config": shape, "dtype": args.dtype, "device": args.device,
                 "world_size": world.world_size}
    if cuda:
        out["gpu"] = torch.cuda.get_device_name()
        torch.cuda.reset_peak_memory_stats()

    def gib(nbytes: float) -> float:
        return round(nbytes / 2**30, 3)

    t0 = time.perf_counter()
    tok = word_tokenizer(config.vocab_size)
    source = RandomSource(config, seed=args.seed, outlier_blocks=2)
    model = load_lazy(source, dtype=dtype, device=args.device)
    elem = torch.finfo(dtype).bits // 8
    block_params = sum(p.numel() for p in get_blocks(model)[0].parameters())
    resident = sum(p.numel() for p in model.parameters() if not p.is_meta)
    acts = args.calib_samples * args.calib_seqlen * config.hidden_size * elem
    out["sizes_gib"] = {"one_block": gib(block_params * elem), "all_blocks": gib(block_params * elem * config.num_hidden_layers),
                        "resident_non_block": gib(resident * elem), "calibration_hidden_states": gib(acts)}
    out["load_seconds"] = round(time.perf_counter() - t0, 2)
    show(f"{args.shape}-shaped model, {config.num_hidden_layers} blocks of {block_params / 1e6:.0f}M parameters "
          f"({out['sizes_gib']['one_block']} GiB each, {out['sizes_gib']['all_blocks']} GiB in all); resident "
          f"embeddings + head {out['sizes_gib']['resident_non_block']} GiB", flush=True)

    stats = None
    if not args.no_scan:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t1 = time.perf_counter()
        cal = CalibrationConfig(n_samples=args.calib_samples, seqlen=args.calib_seqlen, seed=args.seed)
        report, stats = scan_with_stats(model, tok, ScanConfig(calibration=cal, progress=world.is_main))
        scan_s = time.perf_counter() - t1
        out["scan"] = {"seconds": round(scan_s, 1), "seconds_per_block": round(scan_s / config.num_hidden_layers, 2),
                       "calibration_tokens": args.calib_samples * args.calib_seqlen,
                       "verdicts": report.summary.to_dict() if hasattr(report.summary, "to_dict") else None,
                       "flagged_weight_outlier_layers": [f.name for f in report.layers if f.weight_outlier],
                       "timing": report.timing}
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            out["scan"]["peak_gpu_gib"] = gib(peak)
            out["scan"]["peak_gpu_above_resident_gib"] = gib(peak - base)
            out["scan"]["peak_in_blocks"] = round((peak - base) / (block_params * elem), 2)
        out["scan"]["peak_host_rss_gib"] = round(peak_rss_mb() / 1024, 2)
        show(json.dumps(out["scan"], indent=1), flush=True)

    if args.fix:
        from qdoctor.policy.search import FixConfig, Searcher, search

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t2 = time.perf_counter()
        fcfg = FixConfig(calibration=CalibrationConfig(n_samples=args.fix_calib, seqlen=args.calib_seqlen,
                                                       seed=args.seed, sample_rows=512, holdout_fraction=0.2),
                         eval_windows=args.fix_windows, eval_seqlen=args.fix_seqlen, cost_m=args.cost_m,
                         gemm_table=args.gemm_table)
        searcher = Searcher(model, tok, fcfg, progress=world.is_main)
        t_setup = time.perf_counter() - t2
        result = search(model, tok, fcfg, progress=world.is_main, searcher=searcher)
        fix_s = time.perf_counter() - t2
        out["fix"] = {"seconds": round(fix_s, 1), "setup_seconds": round(t_setup, 1),
                      "trials": len(result.trials), "seconds_per_trial": round((fix_s - t_setup) / max(len(result.trials), 1), 1),
                      "plan": result.best.label, "layers_kept": result.best.kept,
                      "layers_per_group": result.best.per_group, "block_reads": model.qdoctor_lazy.loads,
                      "fp_ppl": searcher.fp_ppl, "trial_ppls": [t.ppl for t in result.trials],  # equal for any --nproc
                      "serve": fcfg.profile.describe(), "cost": result.cost}
        if cuda:
            out["fix"]["peak_gpu_gib"] = gib(torch.cuda.max_memory_allocated())
        out["fix"]["peak_host_rss_gib"] = round(peak_rss_mb() / 1024, 2)
        show(json.dumps(out["fix"], indent=1), flush=True)
    if args.export:
        import shutil
        import tempfile
        from pathlib import Path

        from qdoctor.export import export_checkpoint
        from qdoctor.policy.recipe import Recipe
        from qdoctor.quant.spec import get_scheme

        target = Path(args.export_dir) if args.export_dir else Path(tempfile.mkdtemp(prefix="qdoctor-export-")) / "ckpt"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t3 = time.perf_counter()
        scheme = "w8a8-channel-tensor-static" if stats is not None else "w8a8-channel-token"
        rep = export_checkpoint(model, tok, target, recipe=Recipe(scheme=get_scheme(scheme)), stats=stats,
                                max_shard_size=None, progress=world.is_main)
        out["export"] = {"seconds": round(time.perf_counter() - t3, 1), "scheme": scheme,
                         "blocks": config.num_hidden_layers,
                         "weights_gib": gib(rep.weights_bytes), "bf16_gib": gib(rep.bf16_bytes),
                         "files": len(rep.files)}
        if cuda:
            out["export"]["peak_gpu_gib"] = gib(torch.cuda.max_memory_allocated())
        out["export"]["peak_host_rss_gib"] = round(peak_rss_mb() / 1024, 2)
        if not args.export_dir:
            shutil.rmtree(target.parent)
        show(json.dumps(out["export"], indent=1), flush=True)
    out["total_seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        atomic_write_json(args.json, out)
    show(f"total {out['total_seconds']} s")
    shutdown_world()


if __name__ == "__main__":
    main()
