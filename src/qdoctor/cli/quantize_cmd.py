"""``qdoctor quantize --recipe``: re-apply a plan and measure it against full precision."""

from __future__ import annotations

import time

from qdoctor.cli.common import add_model_args, add_ppl_args, add_stream_arg, load_model, read_recipe, require_parent, \
    say


def register(sub) -> None:
    p = sub.add_parser("quantize", help="apply a recipe (from `qdoctor fix`) and measure perplexity")
    add_model_args(p)
    add_stream_arg(p)
    p.add_argument("--recipe", required=True,
                   help="recipe file (YAML or JSON): qdoctor's or llm-compressor's (mapped; notes say what it could "
                        "not express), or a named recipe NAME[:SCHEME], e.g. smoothquant-gptq (SmoothQuant 0.8 + "
                        "GPTQ on w8a8-channel-token) or smoothquant-gptq:w8a8-channel-tensor-static")
    add_ppl_args(p, limit=4)
    p.add_argument("--json", default=None, help="write the results as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from qdoctor.calib.text import text_source
    from qdoctor.eval.perplexity import perplexity, token_windows
    from qdoctor.models.registry import bos_token_id
    recipe = read_recipe(args.recipe)
    require_parent(args.json)
    t0 = time.perf_counter()
    model, tok = load_model(args)
    windows = token_windows(tok, text_source(args.text), args.seqlen, bos_token_id(model, tok))
    fp = perplexity(model, tok, windows=windows, limit=args.limit, desc="full precision")
    q, res = recipe.perplexity(model, tok, windows, desc="recipe", progress=True, limit=args.limit)
    delta = 100 * (q.ppl / fp.ppl - 1)
    kept = res.kept
    print(f"{recipe.scheme.name}: PPL {q.ppl:.3f} vs full precision {fp.ppl:.3f} ({delta:+.2f}%) on "
          f"{q.n_windows} × {q.seqlen} tokens; {len(res.layers) - kept} layers quantized, {kept} kept")
    if args.json:
        from qdoctor.io import atomic_write_json

        atomic_write_json(args.json, {"recipe": args.recipe, "model": args.model, "fp": fp.to_dict(),
                                      "quantized": q.to_dict(), "delta_pct": delta, "kept_layers": kept,
                                      "quantized_layers": len(res.layers) - kept,
                                      "wall_seconds": round(time.perf_counter() - t0, 1)})
        say(f"wrote {args.json}")
    return 0
