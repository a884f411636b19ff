"""The software and machine a result was computed with, for every JSON file ``pml-lm`` writes."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

__all__ = ["environment_record"]


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _processor_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        if names:
            return names[0]
    return platform.processor() or platform.machine()


def environment_record(device: str) -> dict:
    """Versions of this package, torch, numpy and faiss, the torch ``device`` and the CPU model."""
    from pml_largest_margin import __version__

    return {
        "pml_largest_margin": __version__,
        "python": platform.python_version(),
        "torch": _version("torch"),
        "numpy": _version("numpy"),
        "faiss": _version("faiss-cpu") or _version("faiss-gpu") or _version("faiss"),
        "device": str(device),
        "cpu": _processor_name(),
    }
