"""The 2-process harness itself: a crashed worker fails fast instead of blocking the run, and
results survive their worker."""

import os
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from _distributed_harness import _collect, _worker, run_in_workers


def check_rank_zero_crashes(rank, world_size):
    if rank == 0:
        os._exit(3)
    return rank


def test_crashed_worker_fails_the_call_promptly():
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"worker\(s\) \[0\] died"):
        run_in_workers([check_rank_zero_crashes])
    # Long before the 600 s timeout (spawning alone can take tens of seconds on a busy machine).
    assert time.monotonic() - started < 150


def check_returns_tensors(rank, world_size):
    return {"tensor": torch.arange(6.0), "nested": [(rank, torch.ones(2, 3) * rank)]}


def test_results_can_be_read_after_the_worker_has_exited():
    """A tensor put on a queue as torch shares it (by file descriptor) can only be read while its
    sender lives; the harness must send results that do not depend on the worker."""
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory(prefix="pml-lm-dist-") as folder:
        worker = context.Process(
            target=_worker,
            args=(0, 1, str(Path(folder) / "store"), [check_returns_tensors], results, 30),
        )
        worker.start()
        worker.join(timeout=300)
        assert worker.exitcode == 0
        outcome = _collect(results, [worker], timeout_s=30)[0]["check_returns_tensors"]
    torch.testing.assert_close(outcome["tensor"], torch.arange(6.0))
    assert outcome["nested"][0][0] == 0
    torch.testing.assert_close(outcome["nested"][0][1], torch.zeros(2, 3))
