"""Runs check functions inside a 2-process gloo group started once, and returns their results.

The workers are spawned (a fresh interpreter each), join a process group on a free local port,
run every check in order, and send back ``{name: result or error text}``. Timeouts everywhere make
a hang fail the test run instead of blocking it.
"""

from __future__ import annotations

import datetime
import queue
import socket
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _worker(rank, world_size, port, checks, results, collective_timeout_s):
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=collective_timeout_s),
    )
    outcome = {}
    try:
        for check in checks:
            try:
                outcome[check.__name__] = check(rank, world_size)
            except Exception:  # reported to the parent, which fails the matching test
                outcome[check.__name__] = RuntimeError(traceback.format_exc())
    finally:
        results.put((rank, outcome))
        dist.destroy_process_group()


def run_in_workers(checks, world_size=WORLD_SIZE, timeout_s=90, collective_timeout_s=30):
    """``{rank: {check name: result}}`` from running ``checks`` (module-level functions taking
    ``(rank, world_size)``) in ``world_size`` freshly spawned processes."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    workers = [
        context.Process(
            target=_worker,
            args=(rank, world_size, port, checks, results, collective_timeout_s),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for worker in workers:
        worker.start()
    outcomes = {}
    try:
        for _ in range(world_size):
            rank, outcome = results.get(timeout=timeout_s)
            outcomes[rank] = outcome
    except queue.Empty:
        raise TimeoutError(f"distributed workers gave no result within {timeout_s} s") from None
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.terminate()
    return outcomes
