"""The ``qdoctor`` command line: argument parsing and printing only.

Each sub-command lives in its own module with ``register(subparsers)``; the module list
below is the registry. Errors a user can cause (``QDoctorError``) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from qdoctor import __version__
from qdoctor.errors import QDoctorError

COMMANDS = ["qdoctor.cli.eval_cmd", "qdoctor.cli.demo_cmd", "qdoctor.cli.models_cmd"]
COMMANDS.append("qdoctor.cli.scan_cmd")
COMMANDS.append("qdoctor.cli.plant_cmd")
COMMANDS.append("qdoctor.cli.export_cmd")
COMMANDS += ["qdoctor.cli.fix_cmd", "qdoctor.cli.quantize_cmd"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qdoctor", description="Diagnose, treat, verify and export W8A8 "
                                     "quantization of LLaMA-like language models.")
    parser.add_argument("--version", action="version", version=f"qdoctor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod in COMMANDS:
        importlib.import_module(mod).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except QDoctorError as e:
        print(f"qdoctor: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qdoctor: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
