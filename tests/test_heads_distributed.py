"""Margin heads over 2 gloo processes: class-parallel heads against the single-process head, and
running statistics that stay identical across DDP ranks (float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from _distributed_harness import run_in_workers

from pml_largest_margin.distributed import ClassParallelMarginHeadLoss
from pml_largest_margin.losses import (
    AdaCosLoss,
    AdaFaceLoss,
    CurricularFaceLoss,
    DynamicMarginLoss,
    ElasticFaceLoss,
    MagFaceLoss,
)
from pml_largest_margin.regularizers import SampleMarginRegularizer

NUM_CLASSES, EMBEDDING_SIZE, INPUT_SIZE = 7, 6, 4
# Uneven on purpose: 5 samples on rank 0 and 3 on rank 1, classes split 4 / 3.
BATCH_SIZES = (5, 3)
STEPS = 2


def make_head(kind, rank=0):
    """Each head with settings that make its state move; ElasticFace's generator is seeded
    differently on each rank (the wrapper broadcasts rank 0's draws)."""
    torch.manual_seed(0)
    args = (NUM_CLASSES, EMBEDDING_SIZE)
    heads = {
        "adaface": lambda: AdaFaceLoss(*args, t_alpha=0.5, h=1.0, scale=8.0),
        "magface": lambda: MagFaceLoss(*args, scale=8.0),
        "elastic-arc": lambda: ElasticFaceLoss(
            *args, std=0.1, scale=8.0, generator=torch.Generator().manual_seed(10 + rank)
        ),
        "adacos": lambda: AdaCosLoss(*args),
        "dynamic": lambda: DynamicMarginLoss(*args, class_counts=[1, 3, 9, 27, 81, 243, 729]),
        "magface+rsm": lambda: MagFaceLoss(*args, scale=8.0, **_regularizer_options("+rsm")),
        "curricular": lambda: CurricularFaceLoss(*args, scale=8.0),
    }
    return heads[_head_kind(kind)]().double()


# "@stream": the class-parallel loss streams over each rank's columns (the reference buffers).
KINDS = ("adaface", "magface", "elastic-arc", "adacos", "dynamic", "magface+rsm", "curricular",
         "curricular@stream", "adaface@stream")  # fmt: skip


def _head_kind(kind):
    return kind.removesuffix("@stream")


def _problem(step):
    generator = torch.Generator().manual_seed(step)
    inputs = torch.randn(sum(BATCH_SIZES), INPUT_SIZE, generator=generator, dtype=torch.float64)
    labels = (
        torch.tensor([0, 6, 3, 4, 3, 1, 5, 2])
        if step == 0
        else torch.randperm(8, generator=generator) % 7
    )
    return inputs, labels


def _backbone_and_W():
    generator = torch.Generator().manual_seed(99)
    W = torch.randn(EMBEDDING_SIZE, NUM_CLASSES, generator=generator, dtype=torch.float64)
    backbone = torch.nn.Linear(INPUT_SIZE, EMBEDDING_SIZE).double()
    with torch.no_grad():
        # Norms from a few units to ~100: MagFace's clipping range and AdaFace's spread.
        backbone.weight.copy_(20 * torch.randn(backbone.weight.shape, generator=generator))
        backbone.bias.copy_(torch.randn(backbone.bias.shape, generator=generator))
    return backbone, W


def _local_rows(tensor, rank):
    start = sum(BATCH_SIZES[:rank])
    return tensor[start : start + BATCH_SIZES[rank]]


def _regularizer_options(kind):
    if kind.endswith("+rsm"):
        return {
            "sample_margin_regularizer": SampleMarginRegularizer(),
            "sample_margin_reg_weight": 0.3,
        }
    return {}


def _buffers(module):
    return {name: buffer.numpy().copy() for name, buffer in module.named_buffers()}


def _steps(loss_fn, model, rows=lambda tensor: tensor):
    """STEPS forward/backward passes; the last one's loss and gradients, and the buffers."""
    for step in range(STEPS):
        inputs, labels = _problem(step)
        loss_fn.zero_grad()
        model.zero_grad()
        loss = loss_fn(model(rows(inputs)), rows(labels))
        loss.backward()
    module = model.module if hasattr(model, "module") else model
    return {
        "loss": loss.item(),
        "W_grad": loss_fn.W.grad.numpy().copy(),
        "backbone_grads": [p.grad.numpy().copy() for p in module.parameters()],
    }


def _stream_in_blocks_of_two_columns():
    """Streaming passes of 2 columns, so that each rank's 4 or 3 classes span several blocks."""
    from pml_largest_margin.distributed import _sharded_cosine_statistics
    from pml_largest_margin.losses import curricular_face_loss

    for module in (_sharded_cosine_statistics, curricular_face_loss):
        module.stream_block_columns = lambda num_rows, device, dtype=None: 2


def check_class_parallel_heads(rank, world_size):
    torch.set_num_threads(1)
    _stream_in_blocks_of_two_columns()
    outcome = {}
    for kind in KINDS:
        backbone, W = _backbone_and_W()
        head = make_head(_head_kind(kind).removesuffix("+rsm"), rank)
        memory = "stream" if kind.endswith("@stream") else "buffer"
        loss_fn = ClassParallelMarginHeadLoss(head, memory=memory, **_regularizer_options(kind))
        loss_fn.load_full_W(W)
        model = torch.nn.parallel.DistributedDataParallel(backbone)
        result = _steps(loss_fn, model, rows=lambda tensor: _local_rows(tensor, rank))
        result["class_range"] = loss_fn.class_range
        result["buffers"] = {k: v for k, v in _buffers(loss_fn).items() if k.startswith("head.")}
        result["state_keys"] = sorted(loss_fn.state_dict())
        outcome[kind] = result
    return outcome


def check_ddp_running_statistics(rank, world_size):
    """Plain DDP: every rank its own batch and the full W; the heads' statistics all-reduced."""
    torch.set_num_threads(1)
    outcome = {}
    inputs, labels = _problem(0)
    backbone, W = _backbone_and_W()
    embeddings = backbone(_local_rows(inputs, rank)).detach()
    for synced in (True, False):
        group = dist.group.WORLD if synced else None
        for kind, head in (
            ("adaface", AdaFaceLoss(NUM_CLASSES, EMBEDDING_SIZE, t_alpha=0.5, process_group=group)),
            ("adacos", AdaCosLoss(NUM_CLASSES, EMBEDDING_SIZE, process_group=group)),
        ):
            head = head.double()
            with torch.no_grad():
                head.W.copy_(W)
            head(embeddings.clone().requires_grad_(True), _local_rows(labels, rank)).backward()
            outcome[(kind, synced)] = _buffers(head)
    return outcome


def check_bad_wrapping(rank, world_size):
    errors = {}
    for name, build in {
        "not a head": lambda: ClassParallelMarginHeadLoss(torch.nn.Linear(2, 2)),
        "curricular with a regularizer": lambda: ClassParallelMarginHeadLoss(
            CurricularFaceLoss(NUM_CLASSES, EMBEDDING_SIZE),
            sample_margin_regularizer=SampleMarginRegularizer(),
        ),
        "head with a group": lambda: ClassParallelMarginHeadLoss(
            AdaFaceLoss(NUM_CLASSES, EMBEDDING_SIZE, process_group=dist.group.WORLD)
        ),
    }.items():
        try:
            build()
            errors[name] = "no error"
        except (TypeError, ValueError) as caught:
            errors[name] = f"{type(caught).__name__}: {caught}"
    head = AdaFaceLoss(NUM_CLASSES, EMBEDDING_SIZE)
    ClassParallelMarginHeadLoss(head)
    try:
        ClassParallelMarginHeadLoss(head)
        errors["taken twice"] = "no error"
    except ValueError as caught:
        errors["taken twice"] = f"ValueError: {caught}"
    return errors


CHECKS = [check_class_parallel_heads, check_ddp_running_statistics, check_bad_wrapping]


@pytest.fixture(scope="module")
def worker_results():
    return run_in_workers(CHECKS)


def _results(worker_results, check):
    per_rank = [worker_results[rank][check.__name__] for rank in sorted(worker_results)]
    for result in per_rank:
        if isinstance(result, Exception):
            raise result
    return per_rank


def _single_process(kind):
    backbone, W = _backbone_and_W()
    loss_fn = make_head(kind, rank=0)
    with torch.no_grad():
        loss_fn.W.copy_(W)
    result = _steps(loss_fn, backbone)
    result["buffers"] = {f"head.{k}": v for k, v in _buffers(loss_fn).items()}
    return result


@pytest.mark.parametrize("kind", KINDS)
def test_class_parallel_head_matches_single_process_head(worker_results, kind):
    per_rank = [result[kind] for result in _results(worker_results, check_class_parallel_heads)]
    reference = _single_process(kind)
    assert [result["class_range"] for result in per_rank] == [(0, 4), (4, 7)]
    for result in per_rank:
        assert result["loss"] == pytest.approx(reference["loss"], rel=1e-6, abs=1e-6)
        start, stop = result["class_range"]
        np.testing.assert_allclose(result["W_grad"], reference["W_grad"][:, start:stop],
                                   rtol=1e-6, atol=1e-9)  # fmt: skip
        # DDP has averaged over the ranks: every rank holds the single-process gradient.
        for got, want in zip(result["backbone_grads"], reference["backbone_grads"], strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
        assert result["buffers"].keys() == reference["buffers"].keys()
        for name, value in reference["buffers"].items():
            np.testing.assert_allclose(result["buffers"][name], value, rtol=1e-9, atol=1e-12)
        assert "head.W" not in result["state_keys"] and "W" in result["state_keys"]


def test_class_parallel_heads_state_moves():
    """The checks above are not vacuous: the running statistics leave their initial values."""
    reference = _single_process("adaface")["buffers"]
    assert float(reference["head.running_norm_mean"]) != 20.0
    assert float(_single_process("adacos")["buffers"]["head.running_scale"]) != pytest.approx(
        math.sqrt(2) * math.log(NUM_CLASSES - 1)
    )


def test_ddp_ranks_with_different_batches_end_with_identical_running_statistics(worker_results):
    per_rank = _results(worker_results, check_ddp_running_statistics)
    inputs, labels = _problem(0)
    backbone, W = _backbone_and_W()
    with torch.no_grad():
        embeddings = backbone(inputs)
    norms = embeddings.norm(dim=1).clamp(0.001, 100)
    expected_mean = 0.5 * norms.mean() + 0.5 * 20.0
    expected_std = 0.5 * norms.std() + 0.5 * 100.0
    for rank_result in per_rank:
        adaface = rank_result[("adaface", True)]
        assert float(adaface["running_norm_mean"]) == pytest.approx(float(expected_mean), rel=1e-12)
        assert float(adaface["running_norm_std"]) == pytest.approx(float(expected_std), rel=1e-12)
    # AdaCos: the scale from B_avg and the median target angle of the concatenated batch.
    cosines = torch.nn.functional.normalize(embeddings, dim=1) @ torch.nn.functional.normalize(
        W, dim=0
    )
    old = math.sqrt(2) * math.log(NUM_CLASSES - 1)
    b_avg = torch.exp(old * cosines).scatter(1, labels[:, None], 0.0).sum() / len(labels)
    theta_med = torch.median(torch.acos(cosines.gather(1, labels[:, None])[:, 0]))
    expected_scale = float(torch.log(b_avg) / torch.cos(theta_med.clamp(max=math.pi / 4)))
    for rank_result in per_rank:
        assert float(rank_result[("adacos", True)]["running_scale"]) == pytest.approx(
            expected_scale, rel=1e-12
        )
    # Without a process group every rank keeps its own batch's statistics: they differ.
    for kind, name in (("adaface", "running_norm_mean"), ("adacos", "running_scale")):
        synced = [float(result[(kind, True)][name]) for result in per_rank]
        local = [float(result[(kind, False)][name]) for result in per_rank]
        assert synced[0] == synced[1]
        assert local[0] != pytest.approx(local[1])


def test_bad_wrapping_raises(worker_results):
    for errors in _results(worker_results, check_bad_wrapping):
        assert errors["not a head"].startswith("TypeError")
        assert errors["curricular with a regularizer"].startswith(
            "ValueError: CurricularFaceLoss does not take a sample_margin_regularizer"
        )
        assert errors["head with a group"].startswith("ValueError")
        assert errors["taken twice"].startswith("ValueError")
