"""What every benchmark script shares: a fresh process per case, peak memory, the machine's description.

A script defines ``run_case(**params) -> dict`` and calls :func:`run_case_if_asked` first thing in its
``main``; the parent then measures each case with :func:`measure_in_fresh_process`, so that memory left
over by one case (allocator caches, imported modules) never counts against the next, and every case's
peak resident set size is its own.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

RUN_CASE_FLAG = "--run-case"


def current_rss_bytes() -> int:
    """Resident set size of this process now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def best_seconds(
    step: Callable[[], Any], repeats: int, synchronize: Callable[[], Any] = lambda: None
) -> float:
    """The fastest of ``repeats`` timed calls of ``step``, after one untimed warm-up call."""
    times = []
    for _ in range(repeats + 1):
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def run_case_if_asked(run_case: Callable[..., dict], argv: list[str] | None = None) -> bool:
    """In a child started by :func:`measure_in_fresh_process`: run the case, print its JSON, return True."""
    argv = sys.argv[1:] if argv is None else argv
    if RUN_CASE_FLAG not in argv:
        return False
    params = json.loads(argv[argv.index(RUN_CASE_FLAG) + 1])
    print(json.dumps(run_case(**params)))
    return True


def measure_in_fresh_process(script: str, **params: Any) -> dict:
    """Run ``script``'s ``run_case(**params)`` in a new Python process and return its dict.

    Raises:
        RuntimeError: the child failed (its stderr is quoted), e.g. ran out of memory.
    """
    command = [sys.executable, script, RUN_CASE_FLAG, json.dumps(params)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"case {params} failed with exit status {result.returncode}:\n{result.stderr[-4000:]}"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def best_result(previous: dict | None, result: dict) -> dict:
    """``result`` merged with the best of earlier rounds of the same case: each number the
    smallest seen (the fastest step, since other processes' load only slows a step down, and the
    smallest peak, the same from round to round up to the allocator)."""
    if previous is None:
        return result
    return {
        key: min(previous[key], value) if isinstance(value, (int, float)) else value
        for key, value in result.items()
    }


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: str = "cpu") -> str:
    """One line naming the CPU (or GPU), core count, memory and the library versions that matter."""
    import numpy
    import torch

    if device == "cuda":
        hardware = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        hardware = (
            f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
        )
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{hardware}, {memory_gib:.0f} GiB RAM; Python {platform.python_version()}, "
        f"torch {torch.__version__}, numpy {numpy.__version__}"
    )


def ratio(value: float, reference: float | None) -> str:
    """``value / reference`` to two decimals, or a dash when there is no reference."""
    return "–" if reference is None else f"{value / reference:.2f}"
