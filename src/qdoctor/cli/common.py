"""Arguments and printing shared by several commands."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

from qdoctor.distributed import current_world
from qdoctor.errors import QDoctorError


def add_model_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    """--model (or, ``positional``, a first argument MODEL), --dtype, --device, … ."""
    what = "built-in name (smollm2-135m, gemma3-270m), .gguf file, HF directory or hub id (default: smollm2-135m)"
    if positional:
        p.add_argument("model", nargs="?", default="smollm2-135m", metavar="MODEL", help=what)
    else:
        p.add_argument("--model", default="smollm2-135m", help=what)
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


def add_serve_args(p: argparse.ArgumentParser, what: str, default: str = "vllm") -> None:
    """--serve/--gpu/--tp/--allow-optional-kernels: the runtime profile (``serve.profiles``)."""
    p.add_argument("--serve", default=default, choices=["vllm", "transformers", "any"],
                   help=f"runtime {what} (default {default}: where W8A8 checkpoints are deployed; "
                        "transformers: anything compressed-tensors holds; any: no check)")
    p.add_argument("--gpu", default="hopper", choices=["ampere", "ada", "hopper"],
                   help="vLLM: the GPU generation (default hopper; FP8 W8A8 needs ada or hopper)")
    p.add_argument("--tp", type=positive_int, default=1,
                   help="vLLM: tensor-parallel size (default 1; online Hadamard transforms need 1)")
    p.add_argument("--allow-optional-kernels", action="store_true",
                   help="vLLM: allow the optional Humming kernel (per-group INT8 W8A8, pack-quantized, "
                        "dynamic activations), if your vLLM build has it")


def serve_kwargs(args) -> dict:
    return {"serve": args.serve, "gpu": args.gpu, "tp": args.tp,
            "allow_optional_kernels": args.allow_optional_kernels}


def add_ppl_args(p: argparse.ArgumentParser, limit: int | None = None, limit_help: str | None = None) -> None:
    p.add_argument("--seqlen", type=positive_int, default=2048, help="perplexity window (default 2048)")
    p.add_argument("--limit", type=positive_int, default=limit,
                   help=limit_help or "evaluate only the first N windows" + (f" (default {limit})" if limit
                                                                            else " (default: all)"))
    p.add_argument("--text", default="wikitext2:test",
                   help="evaluation text: wikitext2:test (default) or a UTF-8 text file")


def was_given(args, dest: str) -> bool:
    """Whether the user wrote the option ``dest`` (``main`` records them; a Namespace built by
    hand counts a value other than the default as given)."""
    given = getattr(args, "qdoctor_given", None)
    if given is not None:
        return dest in given
    defaults = getattr(args, "qdoctor_defaults", {})
    return dest in defaults and getattr(args, dest, None) != defaults[dest]


def option_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def refuse_unused(args, dests, why: str) -> None:
    """One line instead of silently ignoring options the chosen mode does not read: the given
    ones among ``dests`` are refused with ``why`` (a clause: "… apply to perplexity only")."""
    given = [option_name(d) for d in dests if was_given(args, d)]
    if given:
        raise QDoctorError(f"{', '.join(given)} {why}")


CALIB_OPTIONS = ("calib_samples", "calib_seqlen", "calib_source", "seed")


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


# Window lengths a command may take, checked against the model's context once it is loaded.
SEQLEN_OPTIONS = ("seqlen", "calib_seqlen", "eval_seqlen", "ppl_seqlen", "sensitivity_seqlen")


def load_model(args):
    from qdoctor.models.loading import check_context, load

    check_out_not_model(args)
    for dest in ("calib_source", "text"):  # a user's text file fails now, not after loading the model
        name = getattr(args, dest, None)
        if isinstance(name, str) and not name.startswith("wikitext2:"):
            from qdoctor.calib.text import text_source

            text_source(name)
    say(f"loading {args.model} …")
    t0 = time.perf_counter()
    stream = getattr(args, "stream", False)
    model, tok = load(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                      device_map=getattr(args, "device_map", None), stream=stream)
    defaults = getattr(args, "qdoctor_defaults", {})
    for dest in SEQLEN_OPTIONS:  # the ones given on the command line (a default may not be used)
        value = getattr(args, dest, None)
        if value is not None and (dest not in defaults or value != defaults[dest]):
            check_context(model, value, "--" + dest.replace("_", "-"))
    for dest, what in (("recipe", "recipe"), ("start_from", "recipe"), ("scheme_file", "scheme file")):
        path = getattr(args, dest, None)
        if path:  # read again (cheap): its layer names must exist in this model
            check_plan_fits(model, _read_plan_file(path, dest), f"{path}: {what}")
    n = sum(p.numel() for p in model.parameters())
    how = "skeleton; blocks are read one at a time" if stream else "parameters"
    say(f"loaded {type(model).__name__} ({n / 1e6:.1f}M {how}) in {time.perf_counter() - t0:.1f}s")
    return model, tok


def _read_plan_file(path: str, dest: str):
    if dest in ("recipe", "start_from"):
        from qdoctor.policy.recipe import load_recipe

        return load_recipe(path)
    from qdoctor.quant.schemefile import load_scheme_file

    return load_scheme_file(path)


def read_recipe(path: str):
    """The recipe in ``path`` (qdoctor's or llm-compressor's), its import notes printed one a line."""
    from qdoctor.policy.recipe import read_recipe as read

    recipe, notes = read(path)
    for note in notes:
        say(f"{path}: note: {note}")
    return recipe


def check_plan_fits(model, plan, what: str = "plan") -> None:
    """Every override glob of a scheme or recipe, and every smoothing step's layer glob, must
    match a linear layer of ``model``: a plan written for another model (other layer names,
    more blocks) is refused instead of being silently ignored where it does not match."""
    import fnmatch

    import torch.nn as nn

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    scheme = getattr(plan, "scheme", plan)
    globs = [("override", g) for g in scheme.overrides]
    globs += [("smoothing layer", g) for step in getattr(plan, "smoothing", []) for g in step.layers]
    for kind, g in globs:
        if not any(fnmatch.fnmatchcase(n, g) for n in names):
            example = names[0] if names else "?"
            written = getattr(plan, "model", "")
            raise QDoctorError(f"{what}: {kind} {g!r} matches no linear layer of this model (e.g. {example!r})"
                               + (f"; the plan was written for {written!r}" if written else "")
                               + "; was it made for another model?")


def check_out_not_model(args) -> None:
    """``--out`` must not be, lie inside, or contain the model directory: an export into the
    model's own folder mixes two checkpoints, and ``--overwrite`` of a folder above it would
    delete the model."""
    out = getattr(args, "out", None)
    if not out:
        return
    from pathlib import Path

    from qdoctor.models.loading import describe_source

    info = describe_source(args.model)
    if info["kind"] not in ("hf_dir", "builtin", "gguf"):
        return
    model_dir = Path(info["path"]).resolve()
    if info["kind"] == "gguf":  # a file: only the file itself matters
        model_dir = (model_dir / info["gguf_file"]).resolve()
    target = Path(out).expanduser().resolve()
    if target == model_dir or model_dir in target.parents:
        raise QDoctorError(f"{out}: is inside the model {'directory' if info['kind'] != 'gguf' else 'file'} "
                           f"{model_dir}; write the output somewhere else")
    if target in model_dir.parents:
        raise QDoctorError(f"{out}: contains the model {model_dir}; write the output somewhere else")


def calib_config(args):
    from qdoctor.calib.collect import CalibrationConfig

    return CalibrationConfig(n_samples=args.calib_samples, seqlen=args.calib_seqlen,
                             source=args.calib_source, seed=args.seed)


def say(msg: str) -> None:
    """A progress note on stderr (rank 0 alone under torchrun: ``qdoctor.distributed``)."""
    if current_world().is_main:
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
