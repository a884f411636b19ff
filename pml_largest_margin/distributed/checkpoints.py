"""Class-parallel checkpoints that do not depend on the world size.

A class-parallel loss's ``state_dict()`` holds this rank's slice of W, shape (d, C_local), and as
extra state ``num_classes`` and the rank's ``class_range``; its ``load_state_dict`` refuses a
slice of other classes. The two functions here move W between that sharded form and the
single-process form, so a run saved on one world size resumes on any other (or in one process):

- :func:`consolidate_class_parallel_checkpoint`: every rank's state dict → one single-process
  state dict (W of shape (d, C)), loadable by ``LargestMarginSoftmaxLoss`` or
  ``GeneralizedMarginSoftmaxLoss``;
- :func:`shard_class_parallel_checkpoint`: a single-process state dict → the state dict of one
  rank of a class-parallel loss in a group of any size.

Entries other than W (e.g. the parameters of a learnable ``psi``) are replicated on every rank
and pass through unchanged. Optimizer state (e.g. SGD momentum of W) is not handled here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .sharding import shard_bounds

WEIGHTS_KEY = "W"
# Where torch.nn.Module.state_dict() puts get_extra_state()'s value.
EXTRA_STATE_KEY = "_extra_state"

__all__ = ["consolidate_class_parallel_checkpoint", "shard_class_parallel_checkpoint"]


def _check_weights(state_dict: Mapping, name: str) -> torch.Tensor:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{name} must be a state dict (a mapping), got {type(state_dict).__name__}")
    weights = state_dict.get(WEIGHTS_KEY)
    if not isinstance(weights, torch.Tensor) or weights.ndim != 2:
        raise ValueError(f"{name} must hold the prototypes {WEIGHTS_KEY!r} as a 2-D tensor")
    return weights


def consolidate_class_parallel_checkpoint(
    shards: Sequence[Mapping[str, object]],
) -> dict[str, torch.Tensor]:
    """One single-process state dict from the state dicts of every rank of a class-parallel loss.

    ``shards``: each rank's ``loss.state_dict()``, in any order (each names its classes). W is
    the ranks' slices concatenated by class, shape (d, num_classes); every other entry is taken
    from the shards, which must agree on it. The result loads with ``load_state_dict`` into the
    single-process loss of the same ``num_classes`` and ``embedding_size``, and is what
    :func:`shard_class_parallel_checkpoint` splits for any world size.

    Raises:
        ValueError: no shards; a shard without W or without the class-parallel extra state
            (``num_classes`` and ``class_range``); shards of different ``num_classes``; class
            ranges that do not cover ``[0, num_classes)`` exactly once; a W whose width is not
            its class range's, or whose dimension or dtype differs from the others'; other
            entries that differ between shards or are missing from some.
    """
    if not shards:
        raise ValueError("shards is empty: pass the state dict of every rank")
    pieces = []
    for index, shard in enumerate(shards):
        weights = _check_weights(shard, f"shards[{index}]")
        extra = shard.get(EXTRA_STATE_KEY)
        if not isinstance(extra, Mapping) or {"num_classes", "class_range"} - set(extra):
            raise ValueError(
                f"shards[{index}] is not the state dict of a class-parallel loss: it has no "
                f"{EXTRA_STATE_KEY!r} entry with num_classes and class_range"
            )
        start, stop = extra["class_range"]
        if weights.shape[1] != stop - start:
            raise ValueError(
                f"shards[{index}] holds classes [{start}, {stop}) but its W has "
                f"{weights.shape[1]} columns"
            )
        pieces.append((start, stop, extra["num_classes"], index))
    counts = {num_classes for _, _, num_classes, _ in pieces}
    if len(counts) > 1:
        raise ValueError(f"the shards are of losses with different num_classes: {sorted(counts)}")
    num_classes = counts.pop()
    pieces.sort()
    covered = 0
    for start, stop, _, index in pieces:
        if start != covered:
            problem = "are missing" if start > covered else "are held twice"
            raise ValueError(
                f"classes [{min(start, covered)}, {max(start, covered)}) {problem}: the shards "
                f"must cover [0, {num_classes}) exactly once (shards[{index}] starts at {start})"
            )
        covered = stop
    if covered != num_classes:
        raise ValueError(f"classes [{covered}, {num_classes}) are missing from the shards")
    ordered = [shards[index] for _, _, _, index in pieces]
    weights = [shard[WEIGHTS_KEY] for shard in ordered]
    if len({(piece.shape[0], piece.dtype) for piece in weights}) > 1:
        raise ValueError("the shards' W differ in embedding size or dtype")
    consolidated = {WEIGHTS_KEY: torch.cat([piece.detach() for piece in weights], dim=1)}
    replicated = set(ordered[0]) - {WEIGHTS_KEY, EXTRA_STATE_KEY}
    for shard in ordered:
        if set(shard) - {WEIGHTS_KEY, EXTRA_STATE_KEY} != replicated:
            raise ValueError("the shards hold different entries besides W")
        for key in replicated:
            if not _same_entry(shard[key], ordered[0][key]):
                raise ValueError(f"the replicated entry {key!r} differs between the shards")
    consolidated.update({key: ordered[0][key] for key in sorted(replicated)})
    return consolidated


def _same_entry(first, second) -> bool:
    if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor):
        return first.shape == second.shape and bool(torch.equal(first, second))
    return first == second


def shard_class_parallel_checkpoint(
    state_dict: Mapping[str, object], rank: int, world_size: int
) -> dict[str, object]:
    """Rank ``rank``'s state dict for a class-parallel loss in a group of ``world_size`` ranks.

    ``state_dict``: a single-process loss's ``state_dict()`` or the output of
    :func:`consolidate_class_parallel_checkpoint`, with W of shape (d, num_classes). The result
    holds W's columns ``shard_bounds(num_classes, world_size, rank)`` (a copy, so saving it does
    not save the whole W), the other entries unchanged, and the extra state that the
    class-parallel loss's ``load_state_dict`` checks.

    Raises:
        ValueError: no 2-D W; ``world_size`` not a positive integer, ``rank`` outside
            ``[0, world_size)``, or fewer classes than ranks.
        TypeError: ``state_dict`` is not a mapping.
    """
    weights = _check_weights(state_dict, "state_dict")
    for value, name in ((world_size, "world_size"), (rank, "rank")):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    num_classes = weights.shape[1]
    if world_size > num_classes:
        raise ValueError(
            f"a class-parallel loss needs num_classes >= world size, got {num_classes} classes "
            f"for {world_size} ranks"
        )
    start, stop = shard_bounds(num_classes, world_size, rank)
    shard = {key: value for key, value in state_dict.items() if key != EXTRA_STATE_KEY}
    shard[WEIGHTS_KEY] = weights.detach()[:, start:stop].clone()
    shard[EXTRA_STATE_KEY] = {"num_classes": num_classes, "class_range": (start, stop)}
    return shard
