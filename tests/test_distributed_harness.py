"""The 2-process harness itself: a crashed worker fails fast instead of blocking the run."""

import os
import time

import pytest
from _distributed_harness import run_in_workers


def check_rank_zero_crashes(rank, world_size):
    if rank == 0:
        os._exit(3)
    return rank


def test_crashed_worker_fails_the_call_promptly():
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"worker\(s\) \[0\] died"):
        run_in_workers([check_rank_zero_crashes], timeout_s=60)
    assert time.monotonic() - started < 40
