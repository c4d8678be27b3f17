"""Read a ``Scheme`` from a JSON or YAML file (see docs/schemes.md)."""

from __future__ import annotations

import json
from pathlib import Path

from qdoctor.errors import QDoctorError
from qdoctor.quant.spec import Scheme


def load_scheme_file(path: str) -> Scheme:
    p = Path(path)
    if not p.is_file():
        raise QDoctorError(f"{path}: no such scheme file")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # json.JSONDecodeError / yaml.YAMLError
        raise QDoctorError(f"{path}: not valid {'YAML' if p.suffix.lower() in ('.yaml', '.yml') else 'JSON'} "
                           f"({str(e).splitlines()[0]})") from None
    return Scheme.from_dict(data)
