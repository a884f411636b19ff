"""Runs check functions inside a 2-process gloo group started once, and returns their results.

The workers are spawned (a fresh interpreter each), join a process group through a store file in
a fresh temporary folder (no TCP port to pick, so test modules and concurrent runs cannot
collide), run every check in order, and send back ``{name: result or error text}``. Timeouts
everywhere, and a check on the workers' exit codes while waiting, make a hang or a crashed
worker fail the test run instead of blocking it.

Results travel as bytes of the standard pickle, never as objects on the queue: torch's
multiprocessing reductions would share a tensor's storage by file descriptor, and the parent
fetches that descriptor from the worker's listener, which is gone once the worker has exited
(``FileNotFoundError`` in ``multiprocessing/connection.py`` on a busy machine). Standard pickle
copies tensors by value, wherever they sit in a result.
"""

from __future__ import annotations

import datetime
import pickle
import queue
import tempfile
import time
import traceback
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2


def check_name(check) -> str:
    """The key of a check's result: its function's name (also through ``functools.partial``)."""
    return getattr(check, "__name__", None) or check.func.__name__


def _worker(rank, world_size, store_file, checks, results, collective_timeout_s):
    dist.init_process_group(
        "gloo",
        init_method=Path(store_file).as_uri(),
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=collective_timeout_s),
    )
    outcome = {}
    try:
        for check in checks:
            try:
                outcome[check_name(check)] = check(rank, world_size)
            except Exception:  # reported to the parent, which fails the matching test
                outcome[check_name(check)] = RuntimeError(traceback.format_exc())
    finally:
        try:
            payload = pickle.dumps(outcome)
        except Exception:  # an unpicklable result fails the run with its reason
            payload = pickle.dumps(RuntimeError(traceback.format_exc()))
        results.put((rank, payload))
        dist.destroy_process_group()


def _collect(results, workers, timeout_s):
    deadline = time.monotonic() + timeout_s
    outcomes = {}
    while len(outcomes) < len(workers):
        try:
            rank, payload = results.get(timeout=1.0)
            outcome = pickle.loads(payload)
            if isinstance(outcome, Exception):
                raise RuntimeError(f"distributed worker {rank} could not send its results") from (
                    outcome
                )
            outcomes[rank] = outcome
            continue
        except queue.Empty:
            pass
        crashed = [
            rank
            for rank, worker in enumerate(workers)
            if rank not in outcomes and worker.exitcode not in (None, 0)
        ]
        if crashed:
            raise RuntimeError(f"distributed worker(s) {crashed} died before reporting")
        if time.monotonic() > deadline:
            raise TimeoutError(f"distributed workers gave no result within {timeout_s} s")
    return outcomes


# Generous: on a 2-core machine shared with other test runs, spawning the workers and running the
# checks has taken over 90 s. A crashed worker is still noticed within a second (exit codes).
DEFAULT_TIMEOUT_S, DEFAULT_COLLECTIVE_TIMEOUT_S = 600, 300


def run_in_workers(
    checks,
    world_size=WORLD_SIZE,
    timeout_s=DEFAULT_TIMEOUT_S,
    collective_timeout_s=DEFAULT_COLLECTIVE_TIMEOUT_S,
):
    """``{rank: {check name: result}}`` from running ``checks`` (module-level functions taking
    ``(rank, world_size)``, or ``functools.partial`` objects of such functions) in ``world_size``
    freshly spawned processes."""
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory(prefix="pml-lm-dist-") as folder:
        store_file = str(Path(folder) / "store")
        workers = [
            context.Process(
                target=_worker,
                args=(rank, world_size, store_file, checks, results, collective_timeout_s),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for worker in workers:
            worker.start()
        try:
            return _collect(results, workers, timeout_s)
        finally:
            for worker in workers:
                worker.join(timeout=10)
                if worker.is_alive():
                    worker.terminate()
