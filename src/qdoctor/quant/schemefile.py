"""Read a ``Scheme`` from a JSON or YAML file (see docs/schemes.md); the shared reader of plan
files (schemes, recipes) and the type check of a recipe mapping, so that a malformed file is
one ``QDoctorError`` naming it, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

from qdoctor.errors import QDoctorError
from qdoctor.quant.spec import Scheme


def read_plan_data(path: str, what: str, yaml_always: bool = False):
    """The parsed content of a JSON/YAML file (YAML by extension, or always: YAML ⊃ JSON)."""
    p = Path(path)
    if not p.is_file():
        raise QDoctorError(f"{path}: no such {what} file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise QDoctorError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise QDoctorError(f"{path}: cannot read ({e.strerror or e})") from None
    use_yaml = yaml_always or p.suffix.lower() in (".yaml", ".yml")
    try:
        if use_yaml:
            import yaml

            return yaml.safe_load(text)  # plain data only: no Python tags
        return json.loads(text)
    except Exception as e:  # json.JSONDecodeError / yaml.YAMLError / RecursionError on hostile nesting
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise QDoctorError(f"{path}: not valid {('YAML/JSON' if yaml_always else 'YAML') if use_yaml else 'JSON'} "
                           f"({first})") from None


def load_scheme_file(path: str) -> Scheme:
    return Scheme.from_dict(read_plan_data(path, "scheme"))


_CALIB_TYPES = {"n_samples": int, "seqlen": int, "seed": int, "batch_size": int, "sample_rows": int,
                "source": str, "holdout_fraction": (int, float)}


def check_recipe_dict(d) -> None:
    """Types of a recipe mapping's parts (``policy.recipe.Recipe.from_dict`` checks the keys)."""
    if not isinstance(d, dict):
        raise QDoctorError(f"a recipe must be a mapping, got {type(d).__name__}")
    cal = d.get("calibration") or {}
    if not isinstance(cal, dict):
        raise QDoctorError("recipe 'calibration' must be a mapping")
    for key, typ in _CALIB_TYPES.items():
        if key in cal and (isinstance(cal[key], bool) or not isinstance(cal[key], typ)):
            raise QDoctorError(f"recipe calibration {key!r} must be {'text' if typ is str else 'a number'}, "
                               f"got {cal[key]!r}")
    smoothing = d.get("smoothing") or []
    if not isinstance(smoothing, list) or not all(isinstance(s, dict) for s in smoothing):
        raise QDoctorError("recipe 'smoothing' must be a list of steps (mappings)")
    for s in smoothing:
        layers = s.get("layers", ["*"])
        if not isinstance(layers, (list, tuple)) or not all(isinstance(g, str) for g in layers):
            raise QDoctorError("a smoothing step's 'layers' must be a list of layer-name globs")
        if "method" in s and not isinstance(s["method"], str):
            raise QDoctorError(f"a smoothing step's 'method' must be text, got {s['method']!r}")
    for key in ("evidence", "metrics"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise QDoctorError(f"recipe {key!r} must be a mapping")
