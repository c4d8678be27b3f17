"""``qdoctor export``: quantize a model and save it as a compressed-tensors checkpoint."""

from __future__ import annotations

import argparse
import time

from qdoctor.cli.common import (
    add_calib_args,
    add_model_args,
    add_serve_args,
    add_stream_arg,
    CALIB_OPTIONS,
    calib_config,
    load_model,
    positive_int,
    read_recipe,
    refuse_unused,
    require_parent,
    say,
    serve_kwargs,
)
from qdoctor.errors import QDoctorError


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="quantize and save a compressed-tensors checkpoint (transformers, vLLM)",
        description="Quantize the model with a scheme (or a recipe) and write safetensors shards + config.json "
                    "with a compressed-tensors quantization_config, the tokenizer and a model card. The output is "
                    "written to a temporary directory beside --out and renamed into place at the end.")
    add_model_args(p)
    add_stream_arg(p)
    plan = p.add_mutually_exclusive_group(required=True)
    plan.add_argument("--scheme", default=None, help="a named scheme (see `qdoctor models`)")
    plan.add_argument("--scheme-file", default=None, help="a scheme as JSON/YAML (see docs/schemes.md)")
    plan.add_argument("--recipe", default=None,
                      help="a recipe file (smoothing + scheme + calibration, from the treatment work); "
                           "its calibration settings replace the --calib-* options")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint directory at --out")
    p.add_argument("--save-dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="dtype of the unquantized tensors (embeddings, norms, lm_head; default: the model's)")
    add_serve_args(p, "the checkpoint must run on: a plan it cannot run is refused before anything is written")
    p.add_argument("--require-vllm", action="store_true",
                   help="alias of --serve vllm (kept for old scripts)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="reload the written checkpoint with transformers and compare its WikiText-2 test PPL with "
                        "qdoctor's simulation on the same windows; a gap above 0.3%% fails the export and nothing "
                        "is published (default on; skipped for --stream)")
    p.add_argument("--verify-windows", type=positive_int, default=2,
                   help="WikiText-2 test windows (of --ppl-seqlen tokens) for --verify (default 2, or --ppl-windows)")
    p.add_argument("--card", default=None,
                   help="JSON/YAML file with evidence and measurements for the model card (see docs/export.md)")
    p.add_argument("--ppl-windows", type=positive_int, default=None,
                   help="measure WikiText-2 test perplexity, full precision and quantized, on N windows and put "
                        "both in the model card (default: no measurement)")
    p.add_argument("--ppl-seqlen", type=positive_int, default=2048, help="perplexity window (default 2048)")
    p.add_argument("--max-shard-size", default="2GB",
                   help="safetensors shard size (default 2GB), or 'block': one shard per decoder block")
    add_calib_args(p)
    p.add_argument("--json", default=None, help="write the export report as JSON to this file")
    p.set_defaults(func=run)


def run(args) -> int:
    from qdoctor.export import export_checkpoint
    from qdoctor.export.checkpoint import shard_size_bytes
    from qdoctor.export.staging import check_out_dir
    from qdoctor.policy.recipe import Recipe

    check_out_dir(args.out, args.overwrite)  # before minutes of work
    require_parent(args.json)
    shard_size = None if args.max_shard_size == "block" else args.max_shard_size
    shard_size_bytes(shard_size)  # a bad size fails before the model is loaded
    if not args.ppl_windows:
        refuse_unused(args, ("ppl_seqlen",), "only applies with --ppl-windows N (the model-card perplexity)")
    plan = _read_plan(args)
    if isinstance(plan, Recipe):
        refuse_unused(args, CALIB_OPTIONS, "would be ignored: a recipe calibrates as its file says (edit its "
                                           "'calibration' instead)")
    elif not plan.needs_calibration:
        refuse_unused(args, CALIB_OPTIONS, f"would be ignored: {plan.name} needs no calibration (dynamic "
                                           "activations or weight-only)")
    recipe = Recipe.of(plan, calib_config(args))
    profile = _profile(args)
    card = _read_card(args.card) if args.card else {}
    t0 = time.perf_counter()
    model, tok = load_model(args)
    stats, note = None, None
    if recipe.needs_calibration:
        cfg = recipe.calibration_config()
        say(f"calibrating on {cfg.n_samples} × {cfg.seqlen} tokens of {cfg.source} …")
        stats = recipe.statistics(model, tok)
        note = f"{cfg.n_samples} × {cfg.seqlen} tokens of {cfg.source} (seed {cfg.seed})"
    ppl = {}
    if args.ppl_windows:
        ppl["full_precision"] = _ppl(model, tok, args, "full precision")
        ppl[recipe.name] = _ppl(model, tok, args, recipe.name, recipe=recipe, stats=stats)
        ppl.update(_ppl_setup(args))
    card = _merge_card(card, plan, ppl, note)
    verify = _verify_spec(model, tok, args)
    say(f"exporting to {args.out}, one decoder block at a time"
        + (f", then reloading it to verify on {args.verify_windows or args.ppl_windows} test window(s)" if verify
           else "") + " …")
    report = export_checkpoint(model, tok, args.out, recipe=recipe, stats=stats, overwrite=args.overwrite, card=card,
                               dtype=args.save_dtype, max_shard_size=shard_size, serve=profile, verify=verify)
    for line in report.summary_lines():
        print(line)
    if args.json:
        from qdoctor.io import atomic_write_json

        cal = recipe.calibration_config() if recipe.needs_calibration else None  # the sampler's seed
        atomic_write_json(args.json, {**report.to_dict(), "model": args.model,
                                      "calibration": None if cal is None else {"n_samples": cal.n_samples, "seqlen":
                                                                               cal.seqlen, "source": cal.source,
                                                                               "seed": cal.seed},
                                      "wall_seconds": round(time.perf_counter() - t0, 1)})
        say(f"wrote {args.json}")
    return 0


def _profile(args):
    """The serving profile to check against (``--serve any``: none), said before any work."""
    from qdoctor.serve.profiles import ServeProfile

    kw = serve_kwargs(args)
    if args.require_vllm:
        kw["serve"] = "vllm"
    profile = ServeProfile(kw.pop("serve"), **kw)
    say(f"serving profile: {profile.describe()} (--serve any: no check)")
    return None if profile.runtime == "any" else profile


def _verify_spec(model, tok, args):
    """The --verify windows (the --ppl-windows ones when given), or None (--no-verify, or a
    block-streamed model, which transformers cannot reload beside it)."""
    from qdoctor.export.verify import VerifySpec
    from qdoctor.models.streaming import block_source

    if not args.verify:
        return None
    if not block_source(model).resident:
        say("note: --verify skipped: a block-streamed model's checkpoint is not reloaded in memory beside it")
        return None
    windows = _windows(model, tok, args, args.ppl_windows or args.verify_windows)
    return VerifySpec(windows=windows, text="wikitext2:test")


def _read_plan(args):
    """A Scheme or a Recipe, read and validated before the model is loaded."""
    if args.recipe:
        return read_recipe(args.recipe)
    if args.scheme_file:
        from qdoctor.quant.schemefile import load_scheme_file

        return load_scheme_file(args.scheme_file)
    from qdoctor.quant.spec import get_scheme

    return get_scheme(args.scheme)


def _ppl(model, tok, args, label: str, recipe=None, stats=None) -> float:
    from qdoctor.eval.perplexity import perplexity

    windows = _windows(model, tok, args)
    if recipe is None:
        r = perplexity(model, tok, windows=windows, desc=f"perplexity ({label})")
    else:
        r = recipe.perplexity(model, tok, windows, stats, desc=f"perplexity ({label})", progress=True)[0]
    say(f"perplexity ({label}): {r.ppl:.4f} on {r.n_windows} × {r.seqlen} tokens")
    return r.ppl


def _windows(model, tok, args, n: int | None = None):
    from qdoctor.calib.text import text_source
    from qdoctor.eval.perplexity import token_windows
    from qdoctor.models.registry import bos_token_id

    return token_windows(tok, text_source("wikitext2:test"), args.ppl_seqlen,
                         bos_token_id(model, tok))[: n or args.ppl_windows]


def _ppl_setup(args) -> dict:
    return {"windows": args.ppl_windows, "seqlen": args.ppl_seqlen, "text": "wikitext2:test"}


def _read_card(path: str) -> dict:
    from qdoctor.quant.schemefile import read_plan_data

    data = read_plan_data(path, "card", yaml_always=True)  # YAML is a superset of JSON
    if not isinstance(data, dict):
        raise QDoctorError(f"{path}: a card file must hold a mapping (evidence, ppl, metrics, notes, title)")
    unknown = set(data) - {"title", "evidence", "ppl", "metrics", "notes"}
    if unknown:
        raise QDoctorError(f"{path}: unknown card key(s) {', '.join(sorted(unknown))} "
                           "(allowed: title, evidence, ppl, metrics, notes)")
    return data


def _merge_card(card: dict, plan, ppl: dict, calib_note: str | None) -> dict:
    """The caller's card, plus what this run measured or used — never anything invented."""
    card = {k: (dict(v) if isinstance(v, dict) else v) for k, v in card.items()}
    evidence = card.setdefault("evidence", {})
    metrics = card.setdefault("metrics", {})
    for k, v in (getattr(plan, "evidence", None) or {}).items():  # a recipe's evidence and search metrics
        evidence.setdefault(k, v)
    for k, v in (getattr(plan, "metrics", None) or {}).items():
        metrics.setdefault(k, v)
    if ppl:
        card["ppl"] = {**ppl, **(card.get("ppl") or {})}
    if calib_note:
        metrics.setdefault("calibration", calib_note)
    return {k: v for k, v in card.items() if v}
