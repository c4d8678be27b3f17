"""Arguments and printing shared by several commands."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

from qdoctor.errors import QDoctorError


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="built-in name (smollm2-135m, gemma3-270m), .gguf file, HF directory or hub id "
                        "(default: smollm2-135m)")
    p.add_argument("--dtype", default=None, help="fp32 (CPU default), bf16 (GPU default) or fp16")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint (off by default)")
    p.add_argument("--device-map", default=None,
                   help="spread the model over several GPUs with accelerate (e.g. auto); default: one --device")


def add_stream_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stream", action="store_true",
                   help="read one decoder block at a time from the safetensors checkpoint (models larger than "
                        "memory: only one block, the embeddings/LM head and the activations are resident)")


def add_calib_args(p: argparse.ArgumentParser, samples: int = 64, seqlen: int = 512) -> None:
    p.add_argument("--calib-samples", type=positive_int, default=samples,
                   help=f"calibration samples (default {samples})")
    p.add_argument("--calib-seqlen", type=positive_int, default=seqlen,
                   help=f"tokens per calibration sample (default {seqlen})")
    p.add_argument("--calib-source", default="wikitext2:valid",
                   help="calibration text: wikitext2:valid (default; WikiText-2 train is not shipped) or a text file")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")


def add_ppl_args(p: argparse.ArgumentParser, limit: int | None = None) -> None:
    p.add_argument("--seqlen", type=positive_int, default=2048, help="perplexity window (default 2048)")
    p.add_argument("--limit", type=positive_int, default=limit,
                   help="evaluate only the first N windows" + (f" (default {limit})" if limit else " (default: all)"))
    p.add_argument("--text", default="wikitext2:test",
                   help="evaluation text: wikitext2:test (default) or a UTF-8 text file")


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def load_model(args):
    from qdoctor.models.loading import load

    say(f"loading {args.model} …")
    t0 = time.perf_counter()
    stream = getattr(args, "stream", False)
    model, tok = load(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                      device_map=getattr(args, "device_map", None), stream=stream)
    n = sum(p.numel() for p in model.parameters())
    how = "skeleton; blocks are read one at a time" if stream else "parameters"
    say(f"loaded {type(model).__name__} ({n / 1e6:.1f}M {how}) in {time.perf_counter() - t0:.1f}s")
    return model, tok


def calib_config(args):
    from qdoctor.calib.collect import CalibrationConfig

    return CalibrationConfig(n_samples=args.calib_samples, seqlen=args.calib_seqlen,
                             source=args.calib_source, seed=args.seed)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def environment() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "cuda": torch.cuda.is_available()}


def require_parent(path: str | None) -> None:
    if path:
        from qdoctor.io import check_writable

        check_writable(path)


def split_list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise QDoctorError("empty list")
    return items
