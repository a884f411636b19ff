"""The ``pml-lm`` command: one subcommand a module, each module exposing ``add_subparser``.

Start-up rule (``pml-lm --help`` in well under a second): building the parser imports no torch,
numpy, scipy, PML, FAISS or numba. A subcommand module imports only the standard library and
light modules (this package, ``cli.environment``, ``cli.progress``, ``demo.methods``) at
module level and in ``add_subparser``; everything heavy is imported inside the function that runs
the command. ``tests/test_cli_startup.py`` checks this for every module listed below.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = [
    "CommandError",
    "HelpFormatter",
    "build_parser",
    "check_device",
    "check_output_dir",
    "check_output_file",
    "load_npz",
    "main",
    "output_dir_created",
    "refuse_options",
    "write_json",
]

# Each module defines ``add_subparser(subparsers)``, which registers its parser and sets ``func``.
_SUBCOMMAND_MODULES: tuple[str, ...] = (
    "demo",
    "train",
    "embed",
    "prototypes",
    "eval_reid",
    "eval_verify",
)

# The exit status of a program ended by SIGINT, as shells report it (128 + 2).
INTERRUPTED_STATUS = 130


class CommandError(Exception):
    """A problem a user can fix (missing folder, bad option); printed as one line, exit status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks; every option with a default shows it.

    Options without a real default (``None``, or off for a flag) show nothing, rather than
    ``(default: None)``.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Every subcommand's parser formats its help with :class:`HelpFormatter`."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def refuse_options(args: argparse.Namespace, options: Sequence[str], reason: str) -> None:
    """Refuse those of ``options`` (``"--metric"``, ...) that were given, as not applying.

    Raises:
        CommandError: ``"--metric, --device {reason}"`` for the options whose value is not None.
    """
    given = [
        option for option in options if getattr(args, option[2:].replace("-", "_")) is not None
    ]
    if given:
        raise CommandError(f"{', '.join(given)} {reason}")


def check_output_dir(path: Path, option: str = "--output-dir") -> None:
    """Refuse an output folder that cannot be made: a file in its place or above it, or an
    unwritable parent.

    Raises:
        CommandError: ``path`` exists as something other than a folder, or its nearest existing
            ancestor is not a writable folder.
    """
    if path.exists():
        if not path.is_dir():
            raise CommandError(f"{option} {path} exists and is not a directory")
        if not os.access(path, os.W_OK):
            raise CommandError(f"{option} {path} is not writable")
        return
    _check_creatable(path, option)


def check_output_file(path: Path, option: str) -> None:
    """Refuse an output file that could not be written, before any work is done.

    Raises:
        CommandError: ``path`` is a folder, or its nearest existing ancestor is not a writable
            folder.
    """
    if path.is_dir():
        raise CommandError(f"{option} {path} is a directory")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise CommandError(f"{option} {path} is not writable")
        return
    _check_creatable(path, option)


def _check_creatable(path: Path, option: str) -> None:
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CommandError(f"{option} {path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CommandError(f"{option} {path}: {ancestor} is not writable")


@contextlib.contextmanager
def output_dir_created(path: Path) -> Iterator[Path]:
    """Make ``path`` (and missing parents); if the body fails, remove those of them still empty.

    A command that fails or is interrupted then leaves no empty folder it created.
    """
    missing = []
    folder = path.absolute()
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        for folder in missing:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()  # only succeeds on an empty folder
        raise


def load_npz(path: Path) -> dict:
    """The named arrays of an ``.npz`` file, read without pickles.

    Raises:
        CommandError: ``path`` is not a file, not an ``.npz`` archive, or a damaged one.
    """
    import zipfile

    import numpy as np

    if not path.is_file():
        raise CommandError(f"{path} is not a file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        # numpy takes any file that is neither .npz nor .npy for a pickle.
        reason = "not an .npz archive" if "pickle" in str(error) else error
        raise CommandError(f"{path} cannot be read as .npz: {reason}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise CommandError(f"{path} holds a single array; expected an .npz with named arrays")
    with archive:
        try:
            return {name: archive[name] for name in archive.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
            raise CommandError(f"{path} cannot be read as .npz: {error}") from None


def write_json(path: Path, record: dict) -> None:
    """``record`` as indented JSON in ``path`` (``-``: standard output), parents made as needed."""
    import json

    text = json.dumps(record, indent=2)
    if str(path) == "-":
        print(text)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def check_device(name: str | None) -> str | None:
    """A ``--device`` value checked against this machine: ``None`` or ``"auto"`` (let the command
    choose), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``.

    Returns:
        The name, or ``None`` for the automatic choice.

    Raises:
        CommandError: an unknown device type, or one this machine does not have.
    """
    if name is None or name == "auto":
        return None
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CommandError(
            f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CommandError(f"--device {name}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise CommandError(f"--device {name}: this machine has {count} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise CommandError(f"--device {name}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise CommandError(f"--device {name}: only cpu, cuda and mps are supported")
    return name


def _command_name(module_name: str) -> str:
    return module_name.replace("_", "-")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``pml-lm`` parser; given the ``command`` about to run, only that subcommand's module
    builds its parser (the others are bare names), so one heavy module cannot slow the rest."""
    parser = argparse.ArgumentParser(
        prog="pml-lm",
        description="Largest-margin metric learning: demo, training and evaluation.",
        formatter_class=HelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    names = [_command_name(module_name) for module_name in _SUBCOMMAND_MODULES]
    for module_name, name in zip(_SUBCOMMAND_MODULES, names, strict=True):
        if command in names and name != command:
            subparsers.add_parser(name)
        else:
            importlib.import_module(f"{__name__}.{module_name}").add_subparser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``pml-lm`` with ``argv`` (default: the command line); returns the exit status.

    A user error ends in one line ``pml-lm CMD: error: ...`` and status 2; Ctrl-C in one line
    and status 130 (a command may say in the interrupt's message what it kept).
    """
    command = "pml-lm"
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        # The top-level parser has no option but --help: the first other word is the command.
        chosen = next((word for word in argv if not word.startswith("-")), None)
        args = build_parser(chosen).parse_args(argv)
        command = f"pml-lm {args.command}"
        return int(args.func(args) or 0)
    except KeyboardInterrupt as interrupt:
        print(f"{command}: {str(interrupt) or 'interrupted'}", file=sys.stderr)
        return INTERRUPTED_STATUS
    # OSError: missing or unwritable paths, a full disk; the message names the file.
    except (CommandError, OSError, ValueError) as error:
        print(f"{command}: error: {error}", file=sys.stderr)
        return 2
