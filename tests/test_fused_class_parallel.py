"""The streaming path of the class-parallel statistics (2 gloo ranks) against the formula and the buffer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _distributed_harness import run_in_workers
from pytorch_metric_learning import miners

from pml_largest_margin.distributed import (
    ClassParallelGeneralizedMarginSoftmaxLoss,
    ClassParallelLargestMarginSoftmaxLoss,
)
from pml_largest_margin.distributed._sharded_cosine_statistics import sharded_cosine_statistics
from pml_largest_margin.distributed.sharding import shard_bounds
from pml_largest_margin.losses import fused
from pml_largest_margin.regularizers import SampleMarginRegularizer

NUM_ROWS, NUM_CLASSES, DIM, SCALE = 10, 11, 4, 6.0
# (rank 0's path, rank 1's path): the paths exchange the same collectives, so they can mix.
PATH_PAIRS = [
    ("buffer", "buffer"),
    ("stream", "stream"),
    ("stream", "buffer"),
    ("auto", "auto"),
    ("auto", "buffer"),
]


def _problem():
    generator = torch.Generator().manual_seed(0)
    unit = torch.nn.functional.normalize(
        torch.randn(NUM_ROWS, DIM, generator=generator, dtype=torch.float64), dim=1
    )
    W = torch.randn(DIM, NUM_CLASSES, generator=generator, dtype=torch.float64)
    # Classes 1 (rank 0) and 9 (rank 1) point the same way, and 2 = 1 on rank 0: the nearest
    # class is tied within a rank and across ranks for samples of other classes.
    W[:, 9] = 2 * W[:, 1]
    W[:, 2] = W[:, 1]
    # Class 7's norm is below NORM_EPS, so it is clamped: a plain scaling, with no projection.
    W[:, 7] *= 5e-13 / torch.linalg.vector_norm(W[:, 7])
    # Class 0 on a block boundary of its own and the first and last class of each shard.
    labels = torch.tensor([0, 5, 6, 10, 3, 7, 1, 8, 4, 0])
    upstream = torch.randn(3, NUM_ROWS, generator=generator, dtype=torch.float64)
    return unit, W, labels, upstream


def _sharded_step(rank, world_size, memory):
    unit, W, labels, upstream = _problem()
    start, stop = shard_bounds(NUM_CLASSES, world_size, rank)
    weights = W[:, start:stop].clone().requires_grad_(True)
    unit = unit.requires_grad_(True)
    local_targets = torch.where((labels >= start) & (labels < stop), labels - start, -1)
    outputs = sharded_cosine_statistics(
        unit, weights, local_targets, SCALE, track_max=True, memory=memory
    )
    total = sum((output * weight).sum() for output, weight in zip(outputs, upstream, strict=True))
    total.backward(retain_graph=True)
    first = _as_numpy([*outputs, unit.grad, weights.grad])
    # Nothing saved is changed by backward: a second one through the same graph adds the same.
    total.backward()
    return first, _as_numpy([unit.grad, weights.grad])


def _as_numpy(tensors):
    """Plain arrays for the trip back to the parent (tensors would travel as shared memory)."""
    return [tensor.detach().numpy().copy() for tensor in tensors]


def check_sharded_statistics(rank, world_size):
    # Blocks of 2 columns for the batch of 10 (shards of 6 and 5 classes); "auto" streams both
    # shards and keeps the products of their last 2 blocks (rank 1: edges 0, 1, 3, 5).
    fused._STREAM_BLOCK_BYTES["cpu"] = 2 * NUM_ROWS * 8
    fused._MIN_STREAM_BLOCK_COLUMNS = 1
    fused.BUFFER_LIMIT_BYTES = 2 * (2 * NUM_ROWS * 8)
    return {pair: _sharded_step(rank, world_size, pair[rank]) for pair in PATH_PAIRS}


def _loss_step(loss_fn, rank):
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn(16, DIM, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (16,), generator=generator)
    W = torch.randn(DIM, NUM_CLASSES, generator=generator, dtype=torch.float64)
    loss_fn = loss_fn.double()
    loss_fn.load_full_W(W)
    local = slice(8 * rank, 8 * rank + 8)
    z = embeddings[local].clone().requires_grad_(True)
    indices_tuple = miners.MultiSimilarityMiner()(z, labels[local])
    loss = loss_fn(z, labels[local], indices_tuple)
    loss.backward()
    stats = torch.tensor([loss_fn.mean_sample_margin, loss_fn.min_sample_margin])
    return _as_numpy([loss, z.grad, loss_fn.W.grad, stats])


def check_class_parallel_losses(rank, world_size):
    fused._STREAM_BLOCK_BYTES["cpu"] = 3 * 16 * 8
    fused._MIN_STREAM_BLOCK_COLUMNS = 1
    builders = {
        "lm": lambda **kwargs: ClassParallelLargestMarginSoftmaxLoss(
            NUM_CLASSES, DIM, scale=SCALE, **kwargs
        ),
        "arcface": lambda **kwargs: ClassParallelGeneralizedMarginSoftmaxLoss.preset(
            "arcface", NUM_CLASSES, DIM, **kwargs
        ),
    }
    results = {}
    for name, build in builders.items():
        for memory in ("buffer", "stream"):
            loss_fn = build(
                memory=memory,
                sample_margin_regularizer=SampleMarginRegularizer(),
                sample_margin_reg_weight=0.3,
                collect_stats=True,
            )
            results[name, memory] = _loss_step(loss_fn, rank)
    try:
        ClassParallelLargestMarginSoftmaxLoss(NUM_CLASSES, DIM, memory="lazy")
    except ValueError as error:
        results["bad memory"] = str(error)
    return results


@pytest.fixture(scope="module")
def worker_results():
    results = run_in_workers([check_sharded_statistics, check_class_parallel_losses])
    for outcome in results.values():
        for result in outcome.values():
            if isinstance(result, Exception):
                raise result
    return results


def _reference():
    """u, t and the non-target maximum by autograd through the formula, on one process."""
    unit, W, labels, upstream = _problem()
    unit.requires_grad_(True)
    W.requires_grad_(True)
    cosines = unit @ torch.nn.functional.normalize(W, dim=0)
    is_target = torch.nn.functional.one_hot(labels, NUM_CLASSES).bool()
    non_target = cosines.masked_fill(is_target, -torch.inf)
    outputs = (
        torch.logsumexp(SCALE * non_target, dim=1),
        cosines.gather(1, labels[:, None]).squeeze(1),
        non_target.amax(dim=1),
    )
    total = sum((output * weight).sum() for output, weight in zip(outputs, upstream, strict=True))
    total.backward()
    return [tensor.detach().numpy() for tensor in (*outputs, unit.grad, W.grad)]


@pytest.mark.parametrize("pair", PATH_PAIRS)
def test_sharded_statistics_match_the_formula_on_both_paths(worker_results, pair):
    *want_outputs, want_unit_grad, want_W_grad = _reference()
    for rank in (0, 1):
        first, second = worker_results[rank]["check_sharded_statistics"][pair]
        *outputs, unit_grad, weight_grad = first
        for twice, once in zip(second, (unit_grad, weight_grad), strict=True):
            np.testing.assert_allclose(twice, 2 * once, rtol=1e-14)
        for got, want in zip(outputs, want_outputs, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(unit_grad, want_unit_grad, rtol=1e-12, atol=1e-12)
        start, stop = shard_bounds(NUM_CLASSES, 2, rank)
        np.testing.assert_allclose(weight_grad, want_W_grad[:, start:stop], rtol=1e-12, atol=1e-12)
    # The tie is real: the maximum's gradient reaches the tied classes on both ranks.
    assert np.abs(want_W_grad[:, [1, 2, 9]]).sum(axis=0).min() > 0


@pytest.mark.parametrize("name", ["lm", "arcface"])
def test_class_parallel_losses_stream_exactly(worker_results, name):
    for rank in (0, 1):
        result = worker_results[rank]["check_class_parallel_losses"]
        for got, want in zip(result[name, "stream"], result[name, "buffer"], strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_class_parallel_memory_is_validated(worker_results):
    assert "memory must be one of" in worker_results[0]["check_class_parallel_losses"]["bad memory"]
