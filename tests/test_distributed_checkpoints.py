"""Class-parallel checkpoints across world sizes: trained on 2 gloo ranks, consolidated into the
single-process loss, resumed on 3 ranks; the same loss (float64) at every stage."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _distributed_harness import run_in_workers

from pml_largest_margin.distributed import (
    ClassParallelGeneralizedMarginSoftmaxLoss,
    ClassParallelLargestMarginSoftmaxLoss,
    consolidate_class_parallel_checkpoint,
    shard_bounds,
    shard_class_parallel_checkpoint,
)
from pml_largest_margin.losses import GeneralizedMarginSoftmaxLoss, LargestMarginSoftmaxLoss

# 8 classes: 2 ranks hold 4 each (equal shapes, so a swapped shard is caught by its classes, not
# by its shape), 3 ranks hold 3, 3 and 2.
NUM_CLASSES, EMBEDDING_SIZE, SCALE, BATCH = 8, 6, 4.0, 9
CASES = ("lm", "arcface")


def _loss(case, class_parallel):
    if case == "lm":
        loss_class = (
            ClassParallelLargestMarginSoftmaxLoss if class_parallel else LargestMarginSoftmaxLoss
        )
        return loss_class(NUM_CLASSES, EMBEDDING_SIZE, scale=SCALE).double()
    loss_class = (
        ClassParallelGeneralizedMarginSoftmaxLoss
        if class_parallel
        else GeneralizedMarginSoftmaxLoss
    )
    return loss_class.preset("arcface", NUM_CLASSES, EMBEDDING_SIZE, scale=SCALE).double()


def _batch(seed):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(BATCH, EMBEDDING_SIZE, generator=generator, dtype=torch.float64)
    return embeddings, torch.randint(0, NUM_CLASSES, (BATCH,), generator=generator)


def _local(tensor, rank, world_size):
    return tensor[slice(*shard_bounds(len(tensor), world_size, rank))]


def _evaluation_loss(loss_fn, rank, world_size):
    embeddings, labels = _batch(seed=2)
    with torch.no_grad():
        return loss_fn(_local(embeddings, rank, world_size), _local(labels, rank, world_size))


def _shard_path(folder, case, rank):
    return Path(folder) / f"{case}-rank{rank}.pt"


def check_train_and_save_on_two_ranks(rank, world_size, folder):
    """One SGD step from a rank-dependent initial W, then save each rank's state dict."""
    results = {}
    for case in CASES:
        torch.manual_seed(rank)
        loss_fn = _loss(case, class_parallel=True)
        embeddings, labels = _batch(seed=1)
        loss_fn(_local(embeddings, rank, world_size), _local(labels, rank, world_size)).backward()
        with torch.no_grad():
            loss_fn.W -= 0.5 * loss_fn.W.grad
        torch.save(loss_fn.state_dict(), _shard_path(folder, case, rank))
        results[case] = _evaluation_loss(loss_fn, rank, world_size).item()
    dist.barrier()  # both shards are on disk
    other = torch.load(_shard_path(folder, "lm", 1 - rank))
    try:
        _loss("lm", class_parallel=True).load_state_dict(other)
    except ValueError as error:
        results["the other rank's shard"] = str(error)
    return results


def check_resume_on_three_ranks(rank, world_size, folder):
    results = {}
    for case in CASES:
        full = torch.load(Path(folder) / f"{case}-full.pt")
        loss_fn = _loss(case, class_parallel=True)
        loss_fn.load_state_dict(shard_class_parallel_checkpoint(full, rank, world_size))
        results[case] = _evaluation_loss(loss_fn, rank, world_size).item()
        results[case, "state"] = loss_fn.state_dict()
    return results


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("class-parallel-checkpoints")
    two = run_in_workers([functools.partial(check_train_and_save_on_two_ranks, folder=folder)])
    two = [two[rank]["check_train_and_save_on_two_ranks"] for rank in range(2)]
    for result in two:
        if isinstance(result, Exception):
            raise result
    singles, fulls = {}, {}
    for case in CASES:
        shards = [torch.load(_shard_path(folder, case, rank)) for rank in range(2)]
        fulls[case] = consolidate_class_parallel_checkpoint(shards)
        torch.save(fulls[case], folder / f"{case}-full.pt")
        single = _loss(case, class_parallel=False)
        single.load_state_dict(fulls[case])
        singles[case] = _evaluation_loss(single, 0, 1).item()
    three = run_in_workers(
        [functools.partial(check_resume_on_three_ranks, folder=folder)], world_size=3
    )
    three = [three[rank]["check_resume_on_three_ranks"] for rank in range(3)]
    for result in three:
        if isinstance(result, Exception):
            raise result
    shards = [torch.load(_shard_path(folder, "lm", rank)) for rank in range(2)]
    return {"two": two, "single": singles, "three": three, "full": fulls, "shards": shards}


def test_two_ranks_to_one_to_three_give_the_same_loss(checkpoints):
    for case in CASES:
        two = [result[case] for result in checkpoints["two"]]
        three = [result[case] for result in checkpoints["three"]]
        single = checkpoints["single"][case]
        # The step changed W (a stale checkpoint would not give these numbers).
        assert two[0] == two[1]
        assert single == pytest.approx(two[0], rel=1e-12)
        for value in three:
            assert value == pytest.approx(single, rel=1e-12)


def test_three_rank_shards_consolidate_to_the_same_W(checkpoints):
    for case in CASES:
        states = [result[case, "state"] for result in checkpoints["three"]]
        assert [state["_extra_state"]["class_range"] for state in states] == [
            (0, 3),
            (3, 6),
            (6, 8),
        ]
        assert all(state["_extra_state"]["num_classes"] == NUM_CLASSES for state in states)
        # In any order: each shard names its classes.
        again = consolidate_class_parallel_checkpoint(states[::-1])
        assert torch.equal(again["W"], checkpoints["full"][case]["W"])
        assert set(again) == {"W"}


def test_state_dict_records_the_class_range_and_load_refuses_other_classes(checkpoints):
    shards = checkpoints["shards"]
    assert [shard["_extra_state"]["class_range"] for shard in shards] == [(0, 4), (4, 8)]
    for rank, result in enumerate(checkpoints["two"]):
        error = result["the other rank's shard"]
        assert f"holds the classes {((4, 8), (0, 4))[rank]}" in error
        assert f"this rank owns {((0, 4), (4, 8))[rank]}" in error
        assert "shard_class_parallel_checkpoint" in error


def test_consolidate_refuses_incomplete_or_inconsistent_shards(checkpoints):
    first, second = checkpoints["shards"]
    full = checkpoints["full"]["lm"]
    with pytest.raises(ValueError, match=r"classes \[4, 8\) are missing"):
        consolidate_class_parallel_checkpoint([first])
    with pytest.raises(ValueError, match=r"classes \[0, 4\) are missing"):
        consolidate_class_parallel_checkpoint([second])
    with pytest.raises(ValueError, match="held twice"):
        consolidate_class_parallel_checkpoint([first, first, second])
    with pytest.raises(ValueError, match="not the state dict of a class-parallel loss"):
        consolidate_class_parallel_checkpoint([full])
    with pytest.raises(ValueError, match="shards is empty"):
        consolidate_class_parallel_checkpoint([])
    narrow = {**second, "W": second["W"][:, :3]}
    with pytest.raises(ValueError, match=r"holds classes \[4, 8\) but its W has 3 columns"):
        consolidate_class_parallel_checkpoint([first, narrow])
    other_count = {**second, "_extra_state": {"num_classes": 9, "class_range": (4, 8)}}
    with pytest.raises(ValueError, match="different num_classes"):
        consolidate_class_parallel_checkpoint([first, other_count])
    with_extra = {**second, "psi.weight": torch.ones(2)}
    with pytest.raises(ValueError, match="different entries besides W"):
        consolidate_class_parallel_checkpoint([first, with_extra])
    differing = [{**first, "psi.weight": torch.ones(2)}, {**second, "psi.weight": torch.zeros(2)}]
    with pytest.raises(ValueError, match="'psi.weight' differs"):
        consolidate_class_parallel_checkpoint(differing)
    replicated = [{**first, "psi.weight": torch.ones(2)}, {**second, "psi.weight": torch.ones(2)}]
    torch.testing.assert_close(
        consolidate_class_parallel_checkpoint(replicated)["psi.weight"], torch.ones(2)
    )


def test_shard_splits_W_for_any_world_size(checkpoints):
    full = checkpoints["full"]["arcface"]
    for world_size in (1, 2, 3, 5, 8):
        shards = [
            shard_class_parallel_checkpoint(full, rank, world_size) for rank in range(world_size)
        ]
        assert torch.equal(consolidate_class_parallel_checkpoint(shards)["W"], full["W"])
        # Copies: saving a shard does not save the whole W.
        assert all(shard["W"].untyped_storage().nbytes() == shard["W"].nbytes for shard in shards)
    with pytest.raises(ValueError, match="num_classes >= world size"):
        shard_class_parallel_checkpoint(full, 0, 9)
    with pytest.raises(ValueError, match="rank must lie in"):
        shard_class_parallel_checkpoint(full, 3, 3)
    with pytest.raises(ValueError, match="world_size must be an integer"):
        shard_class_parallel_checkpoint(full, 0, 2.0)
    with pytest.raises(ValueError, match="2-D tensor"):
        shard_class_parallel_checkpoint({"W": full["W"][0]}, 0, 2)
    with pytest.raises(TypeError, match="mapping"):
        shard_class_parallel_checkpoint(full["W"], 0, 2)
