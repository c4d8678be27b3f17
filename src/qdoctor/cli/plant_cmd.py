"""``qdoctor plant``: write a copy of a model with planted (function-preserving) weight outliers."""

from __future__ import annotations

import time

from qdoctor.cli.common import add_model_args, load_model, refuse_unused, say, split_list
from qdoctor.errors import QDoctorError


def register(sub) -> None:
    p = sub.add_parser("plant", help="plant Llama-3-70B-like weight outliers (function-preserving); save as HF dir",
                       description="Fold large per-input-dimension scales through the norm → q/k/v and norm → "
                                   "gate/up pairs of the given blocks, so max|W| reaches --magnitude on a few input "
                                   "dimensions while the full-precision function is unchanged; save the model as a "
                                   "Hugging Face safetensors directory (with qdoctor_plant.json listing the layers).")
    add_model_args(p)
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--blocks", default="0,1,2", help="comma-separated block indices (default 0,1,2)")
    p.add_argument("--projections", default="q,k,v,gate,up",
                   help="comma-separated projections fed by a norm: q,k,v,gate,up (default all five)")
    p.add_argument("--dims", default="3",
                   help="number of input dimensions per block chosen at random (default 3), or explicit indices "
                        "like 5,77,301")
    p.add_argument("--magnitude", type=float, default=100.0, help="max|W| on the planted dims (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed for choosing the dims (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in split_list(text)]
    except ValueError:
        raise QDoctorError(f"--{what} must be comma-separated integers, got {text!r}") from None


def run(args) -> int:
    from pathlib import Path

    from qdoctor.testing import plant_weight_outliers, save_model

    blocks = _ints(args.blocks, "blocks")
    dims_list = _ints(args.dims, "dims")
    dims = dims_list[0] if len(dims_list) == 1 and "," not in args.dims else dims_list
    if isinstance(dims, int) and dims < 1:
        raise QDoctorError("--dims must be at least 1")
    if not isinstance(dims, int):
        refuse_unused(args, ("seed",), "only applies when --dims is a count (it seeds the random choice of dims); "
                                       "explicit --dims indices are used as given")
    projections = split_list(args.projections)
    out = Path(args.out).expanduser()
    if out.exists() and not args.overwrite:
        raise QDoctorError(f"{args.out}: already exists (pass --overwrite to replace it)")
    if not out.parent.exists():
        raise QDoctorError(f"{args.out}: parent directory {out.parent} does not exist")
    t0 = time.perf_counter()
    model, tok = load_model(args)
    result = plant_weight_outliers(model, blocks=blocks, projections=projections, dims=dims,
                                   magnitude=args.magnitude, seed=args.seed)
    meta = {"source": args.model, "blocks": blocks, "projections": projections, "magnitude": args.magnitude,
            "seed": args.seed, "dims": {str(b): d for b, d in result.dims.items()}, "layers": result.layers}
    save_model(model, tok, str(out), overwrite=args.overwrite, metadata=meta)
    say(f"planted {len(result.layers)} layers ({', '.join(sorted({n.rsplit('.', 1)[-1] for n in result.layers}))} in "
        f"blocks {', '.join(map(str, blocks))}; dims {meta['dims']}) with max|W| ≥ {args.magnitude:g}")
    say(f"wrote {out} in {time.perf_counter() - t0:.1f}s (load it with qdoctor.load({str(out)!r}))")
    return 0
