"""Fixtures shared by every test module."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def seed_global_generators() -> None:
    """Every test starts from the same state of torch's, numpy's and Python's global generators.

    Draws without an explicit generator (a loss's own ``W`` initialisation, ``torch.randn`` in a
    test body) are then the same in every run and whatever ran before, so a failure reproduces;
    tests that need different draws pass their own seeded generator.
    """
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002 -- the legacy global generator is what unseeded draws use
    torch.manual_seed(0)
