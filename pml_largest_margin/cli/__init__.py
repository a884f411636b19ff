"""The ``pml-lm`` command: one subcommand a module, each module exposing ``add_subparser``."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# Each module defines ``add_subparser(subparsers)``, which registers its parser and sets ``func``.
_SUBCOMMAND_MODULES: tuple[str, ...] = (
    "demo",
    "train",
    "embed",
    "prototypes",
    "eval_reid",
    "eval_verify",
)


class CommandError(Exception):
    """A problem a user can fix (missing folder, bad option); printed as one line, exit status 2."""


def check_output_dir(path: Path) -> None:
    """Refuse an ``--output-dir`` that exists as something other than a folder."""
    if path.exists() and not path.is_dir():
        raise CommandError(f"--output-dir {path} exists and is not a directory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pml-lm", description="Largest-margin metric learning: demo, training and evaluation."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in _SUBCOMMAND_MODULES:
        importlib.import_module(f"{__name__}.{module_name}").add_subparser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    # OSError: missing or unwritable paths, a full disk; the message names the file.
    except (CommandError, OSError, ValueError) as error:
        print(f"pml-lm {args.command}: error: {error}", file=sys.stderr)
        return 2
