"""Progress of a long command: one bar with an ETA on a terminal, plain lines otherwise.

Used by ``pml-lm demo`` (one step per training run) and meant for ``pml-lm train`` (one step
per epoch). On a terminal (stderr is a TTY) a single tqdm bar counts the steps and shows the
elapsed time and the ETA; messages print above it. Piped to a file, each finished step is one
line ``[k/n] label: note (elapsed, ETA)`` and nothing is redrawn. ``quiet`` prints nothing.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TextIO

__all__ = ["Progress", "format_seconds", "silenced_trainer_bar"]


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 05 s`` or ``1 h 02 min``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """Count ``total`` steps of a command, on ``stream`` (default: stderr).

    Args:
        total: number of steps.
        description: what a step is, shown before the bar (``"runs"``, ``"epochs"``).
        quiet: print nothing at all.
        stream: where to write; a TTY gets the bar, anything else plain lines.
    """

    def __init__(
        self, total: int, description: str, *, quiet: bool = False, stream: TextIO | None = None
    ) -> None:
        self.total = total
        self.done = 0
        self.quiet = quiet
        self.stream = sys.stderr if stream is None else stream
        self._started = time.perf_counter()
        self._bar = None
        if not quiet and _is_terminal(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc=description,
                file=self.stream,
                bar_format="{desc}: {n_fmt}/{total_fmt} |{bar}| {elapsed}<{remaining} {postfix}",
                dynamic_ncols=True,
            )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def start(self, label: str) -> None:
        """Say which step runs now (on the bar only; plain output waits for its end)."""
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=True)

    def step(self, label: str, note: str = "", *, skipped: bool = False) -> None:
        """One step is done (``skipped``: it was done before, e.g. found by ``--resume``)."""
        self.done += 1
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.update(1)
            return
        elapsed = time.perf_counter() - self._started
        remaining = self.total - self.done
        timing = f"{format_seconds(elapsed)} elapsed"
        if remaining and not skipped:
            timing += f", ETA {format_seconds(elapsed / self.done * remaining)}"
        text = f"[{self.done}/{self.total}] {label}" + (f": {note}" if note else "")
        print(f"{text} ({timing})", file=self.stream, flush=True)

    def write(self, message: str) -> None:
        """A message line (above the bar on a terminal); none when quiet."""
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


@contextlib.contextmanager
def silenced_trainer_bar(trainer: object) -> Iterator[None]:
    """Within the block, ``trainer.train()`` of a PML trainer draws no tqdm bar of its own.

    PML's ``BaseTrainer.train`` calls ``tqdm.tqdm`` of its module on every epoch; that module's
    ``tqdm`` name is swapped for one whose bars are disabled, and restored afterwards.
    """
    from functools import partial
    from types import SimpleNamespace
    from unittest import mock

    import tqdm

    module = sys.modules[type(trainer).train.__module__]
    if not hasattr(module, "tqdm"):  # another PML version: its bar, if any, stays
        yield
        return
    silent = SimpleNamespace(tqdm=partial(tqdm.tqdm, disable=True))
    with mock.patch.object(module, "tqdm", silent):
        yield
