"""The ``qdoctor`` command line: argument parsing and printing only.

Each sub-command lives in its own module with ``register(subparsers)``; the module list
below is the registry. Errors a user can cause (``QDoctorError``) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

from qdoctor import __version__
from qdoctor.errors import QDoctorError

COMMANDS = ["qdoctor.cli.eval_cmd", "qdoctor.cli.demo_cmd", "qdoctor.cli.models_cmd"]
COMMANDS.append("qdoctor.cli.scan_cmd")
COMMANDS.append("qdoctor.cli.plant_cmd")
COMMANDS.append("qdoctor.cli.export_cmd")
COMMANDS += ["qdoctor.cli.fix_cmd", "qdoctor.cli.quantize_cmd"]
COMMANDS.append("qdoctor.cli.doctor_cmd")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qdoctor", description="Diagnose, treat, verify and export W8A8 "
                                     "quantization of LLaMA-like language models.")
    parser.add_argument("--version", action="version", version=f"qdoctor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod in COMMANDS:
        importlib.import_module(mod).register(sub)
    return parser


_NEGATIVE = re.compile(r"^-(\d|\.\d)")  # -3, -3%, -0.5, -.5, -1e3


def _value_options(parser: argparse.ArgumentParser) -> set[str]:
    """Option strings (of the parser and its sub-commands) that take a value."""
    out: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out |= _value_options(sub)
        elif action.option_strings and action.nargs != 0:
            out.update(action.option_strings)
    return out


def join_negative_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--budget -3%`` → ``--budget=-3%``: argparse takes a token starting with ``-`` that is not a
    plain number for an option, so a negative value would never reach the option's own parser
    (which then refuses it with its own message)."""
    takes_value = _value_options(parser)
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            out.extend(argv[i:])
            break
        if tok in takes_value and i + 1 < len(argv) and _NEGATIVE.match(argv[i + 1]):
            out.append(f"{tok}={argv[i + 1]}")
            i += 2
            continue
        out.append(tok)
        i += 1
    return out


def _command_defaults(parser: argparse.ArgumentParser, command: str) -> dict:
    """dest → default of the chosen sub-command (to tell the options a user gave from defaults)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return {a.dest: a.default for a in action.choices[command]._actions}
    return {}


def main(argv: list[str] | None = None) -> int:
    try:  # a Ctrl-C while the sub-commands are imported is an interrupt too, not a traceback
        parser = build_parser()
        argv = sys.argv[1:] if argv is None else list(argv)
        args = parser.parse_args(join_negative_values(parser, argv))
        args.qdoctor_defaults = _command_defaults(parser, args.command)
        return int(args.func(args) or 0)
    except QDoctorError as e:
        print(f"qdoctor: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qdoctor: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
