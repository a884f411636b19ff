"""``pml-lm`` starts fast: building a parser imports nothing heavy; help is terminal text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pml_largest_margin.cli import _SUBCOMMAND_MODULES, build_parser

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "scipy", "sklearn", "faiss", "numba", "pytorch_metric_learning")
HEAVY += ("matplotlib", "evaluation.reid", "evaluation.verification")
COMMANDS = [name.replace("_", "-") for name in _SUBCOMMAND_MODULES]


def _python(code: str, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _modules_after_help(argv: list[str]) -> list[str]:
    """The heavy modules loaded by ``pml-lm ARGV`` (a help request), in a fresh interpreter."""
    code = (
        "import contextlib, io, json, sys\n"
        "from pml_largest_margin.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        f"        main({argv!r})\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    finished = _python(code)
    assert finished.returncode == 0, finished.stderr
    return json.loads(finished.stdout)


@pytest.mark.parametrize("command", COMMANDS)
def test_subcommand_help_imports_nothing_heavy(command):
    assert _modules_after_help([command, "--help"]) == []


def test_top_level_help_imports_nothing_heavy():
    assert _modules_after_help(["--help"]) == []


def test_help_wall_time():
    # Target < 1 s (about 0.1 s unloaded); the bound is loose for a loaded CI machine, the
    # import test above is the strict check.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    finished = subprocess.run(
        [sys.executable, "-m", "pml_largest_margin.cli", "eval-verify", "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 0
    assert time.perf_counter() - started < 5


def _help_text(command: str) -> str:
    parser = build_parser(command)
    subparsers = next(a for a in parser._actions if a.dest == "command")
    return subparsers.choices[command].format_help()


@pytest.mark.parametrize("command", ["demo", "prototypes", "eval-reid", "eval-verify"])
def test_help_is_terminal_text_with_defaults(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping, so that each default reads whole
    parser = build_parser(command)
    subparser = next(a for a in parser._actions if a.dest == "command").choices[command]
    text = subparser.format_help()
    assert "``" not in text and ":func:" not in text
    assert "(default: None)" not in text and "(default: False)" not in text
    for action in subparser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{command} {action.dest} has no help"
        if action.option_strings and action.default not in (None, False):
            assert f"(default: {action.default})" in text, action.dest


def test_eval_verify_help_states_the_library_far_targets():
    from evaluation.verification import DEFAULT_FAR_TARGETS
    from pml_largest_margin.cli.eval_verify import DEFAULT_FAR_HELP

    assert [float(far) for far in DEFAULT_FAR_HELP.split()] == list(DEFAULT_FAR_TARGETS)
    assert DEFAULT_FAR_HELP in " ".join(_help_text("eval-verify").split())
