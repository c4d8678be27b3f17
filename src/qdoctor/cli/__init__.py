"""The ``qdoctor`` command line: argument parsing and printing only.

Each sub-command lives in its own module with ``register(subparsers)``; the module list
below is the registry. Errors a user can cause (``QDoctorError``) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from contextlib import contextmanager, nullcontext, redirect_stdout

from qdoctor import __version__
from qdoctor.distributed import init_world, shutdown_world, world_from_env
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


DISTRIBUTED_COMMANDS = {"eval", "fix"}  # data-parallel under torchrun (docs/distributed.md)


@contextmanager
def launched_world(args):
    """The torchrun world of this process while the command runs (one process: nothing happens).
    Ranks other than 0 print nothing on stdout; outputs are written by rank 0 (``qdoctor.io``)."""
    world = world_from_env()
    if not world.distributed:
        yield world
        return
    if args.command not in DISTRIBUTED_COMMANDS:
        raise QDoctorError(f"`qdoctor {args.command}` does not run data-parallel; launch it without torchrun "
                           f"(data-parallel: {', '.join(sorted(DISTRIBUTED_COMMANDS))})")
    if getattr(args, "device_map", None):
        raise QDoctorError("--device-map spreads one model over the GPUs; under torchrun each rank holds a "
                           "replica on its own GPU: leave --device-map out")
    init_world(world)
    quiet = None if world.is_main else open(os.devnull, "w")
    try:
        with redirect_stdout(quiet) if quiet else nullcontext():
            yield world
    finally:
        shutdown_world()
        if quiet:
            quiet.close()


def _given_options(parser: argparse.ArgumentParser, command: str, argv: list[str]) -> set[str]:
    """dests of the chosen sub-command's options that the user wrote (``--limit 2048`` counts even
    when 2048 is the default): the same arguments parsed again with every default suppressed."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            sub = action.choices[command]
            saved = [(a, a.default) for a in sub._actions]
            for a, _ in saved:
                a.default = argparse.SUPPRESS
            try:
                given = vars(parser.parse_args(argv))
            finally:
                for a, default in saved:
                    a.default = default
            return {dest for dest in given if dest not in ("command", "func")}
    return set()


def main(argv: list[str] | None = None) -> int:
    try:  # a Ctrl-C while the sub-commands are imported is an interrupt too, not a traceback
        parser = build_parser()
        argv = sys.argv[1:] if argv is None else list(argv)
        argv = join_negative_values(parser, argv)
        args = parser.parse_args(argv)
        args.qdoctor_defaults = _command_defaults(parser, args.command)
        args.qdoctor_given = _given_options(parser, args.command, argv)
        with launched_world(args):
            return int(args.func(args) or 0)
    except QDoctorError as e:
        print(f"qdoctor: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qdoctor: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
