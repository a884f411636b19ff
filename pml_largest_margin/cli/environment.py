"""The environment record every JSON file of ``pml-lm`` carries: versions, device and CPU model.

Light on purpose (standard library only): versions come from the installed distributions'
metadata, so recording them imports neither torch nor FAISS.
"""

from __future__ import annotations

import os
import platform
import sys

from .. import __version__

__all__ = ["cpu_model", "environment_record", "installed_version"]

# (record key, distributions that provide it, first installed wins)
_DISTRIBUTIONS = (
    ("torch", ("torch",)),
    ("numpy", ("numpy",)),
    ("faiss", ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss")),
    ("pytorch_metric_learning", ("pytorch-metric-learning",)),
)


def installed_version(distributions: tuple[str, ...]) -> str | None:
    """The version of the first of ``distributions`` that is installed, or ``None``."""
    from importlib import metadata  # 50 ms: not while a parser is built

    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``), or
    ``"unknown"``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith(("model name", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment_record(device: str | None = None) -> dict:
    """What produced a result: ``pml_largest_margin``, Python, torch, numpy, FAISS and PML
    versions (``None`` when not installed), the device the command ran on (``"cuda:0 (NVIDIA
    H100)"`` when torch is already loaded and it is a CUDA device), the CPU model, the number
    of CPU cores and the platform.
    """
    record: dict = {"pml_largest_margin": __version__, "python": platform.python_version()}
    for key, distributions in _DISTRIBUTIONS:
        record[key] = installed_version(distributions)
    record["device"] = _describe_device(device)
    record["cpu"] = cpu_model()
    record["cpu_count"] = _cpu_count()
    record["platform"] = platform.platform()
    return record


def _cpu_count() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _describe_device(device: str | None) -> str:
    if device is None:
        return "cpu"
    torch = sys.modules.get("torch")  # only described further when a command loaded torch
    if torch is not None and device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device
