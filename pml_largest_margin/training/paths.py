"""Checks of output paths, made before any work (light: the command line imports it)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["check_can_create"]


def check_can_create(path: Path, option: str) -> None:
    """Raise ValueError unless ``path`` (or the folders leading to it) can be created.

    The nearest existing ancestor of ``path`` must be a folder this process may write in;
    ``option`` (e.g. ``--output-dir``) starts the message.
    """
    existing = path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: cannot write in {existing}")
