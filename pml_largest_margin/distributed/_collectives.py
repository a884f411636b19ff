"""Collectives with the gradient convention the class-parallel losses rely on.

Convention: a tensor that every rank computes identically ("replicated": the gathered batch, the
per-sample losses, the loss value) stands for ONE quantity of ONE objective, and the gradient each
rank holds for it is the full gradient of that objective. Hence:

- the sharded cosine statistics sum their embedding gradient over ranks inside their backward
  (each rank only sees its own classes), so the gathered embeddings carry the full gradient on
  every rank, exactly like terms computed on the gathered batch by every rank (PML embedding
  regularizers, reducers);
- gathering rows therefore needs no reduction in backward: each rank takes its own rows, scaled
  by the world size so that DDP's averaging over ranks gives the single-process gradient;
- an all-reduce sum whose result is replicated passes the gradient through unchanged.
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Mapping

import torch
import torch.distributed as dist

from ..validation import check_embeddings, check_labels

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def world_size(group=None) -> int:
    return dist.get_world_size(group)


def rank(group=None) -> int:
    return dist.get_rank(group)


def all_gather_rows(tensor: torch.Tensor, sizes: list[int], group=None) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 in rank order; ranks may hold different
    numbers of rows (``sizes``), which are padded for the collective and trimmed afterwards."""
    longest = max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded.contiguous(), group=group)
    return torch.cat([piece[:size] for piece, size in zip(pieces, sizes, strict=True)])


class _GatherRowsWithGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_rows, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return all_gather_rows(local_rows, sizes, group)

    @staticmethod
    def backward(ctx, grad_rows):
        this_rank = rank(ctx.group)
        start = sum(ctx.sizes[:this_rank])
        local = grad_rows[start : start + ctx.sizes[this_rank]]
        return local * world_size(ctx.group), None, None


def gather_rows_with_gradient(local_rows: torch.Tensor, sizes: list[int], group=None):
    """All-gather with gradient; see the module docstring for why backward only slices and scales."""
    return _GatherRowsWithGradient.apply(local_rows, sizes, group)


class _ReplicatedAllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_part, group):
        total = local_part.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        return grad_total, None


def replicated_all_reduce_sum(local_part: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over ranks whose result every rank uses identically (gradient passes straight through)."""
    return _ReplicatedAllReduceSum.apply(local_part, group)


def flat_mined_indices(indices_tuple, batch_size: int) -> torch.Tensor:
    """A miner's ``indices_tuple`` (3 or 4 index tensors into the batch) as one int64 vector.

    PML's ``convert_to_weights`` only counts how often each sample occurs over the whole tuple,
    so the concatenation carries everything the loss needs.
    """
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise ValueError("indices_tuple must be a tuple of 3 or 4 index tensors (a miner's output)")
    for indices in indices_tuple:
        if not isinstance(indices, torch.Tensor) or indices.ndim != 1:
            raise ValueError("indices_tuple must hold 1-D tensors")
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"indices_tuple must hold integer tensors, got {indices.dtype}")
    flat = torch.cat([indices.long().cpu() for indices in indices_tuple])
    if flat.numel() and (flat.min() < 0 or flat.max() >= batch_size):
        raise ValueError(f"indices_tuple must index this rank's batch: [0, {batch_size - 1}]")
    return flat


def comparable_setting(value: object) -> object:
    """A setting as a value that compares and prints the same on every rank: numbers by value
    (so 32 and 32.0 agree), strings, bools and None as they are, anything else by its type."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, numbers.Real):
        number = float(value)
        return int(number) if number.is_integer() else number
    return type(value).__qualname__


def _settings_digest(settings: Mapping[str, object]) -> int:
    """A 64-bit fingerprint of the settings, the same on ranks with equal settings (unlike
    ``hash``, which is salted per process)."""
    text = repr(sorted(settings.items())).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little", signed=True)


def _settings_mismatch(settings: Mapping[str, object], group) -> str:
    """Which settings differ and each rank's value (every rank calls this, on the error path)."""
    everyone = [None] * world_size(group)
    dist.all_gather_object(everyone, dict(settings), group=group)
    # Rank 0's order first, then names only other ranks have: the same text on every rank.
    names = list(dict.fromkeys(name for ranks_settings in everyone for name in ranks_settings))
    missing = "<absent>"
    differing = [
        f"{name}: {[ranks_settings.get(name, missing) for ranks_settings in everyone]}"
        for name in names
        if len({repr(ranks_settings.get(name, missing)) for ranks_settings in everyone}) > 1
    ]
    return "; ".join(differing)


def check_and_exchange_batch(
    embeddings, labels, num_classes: int, embedding_size: int, device, group=None,
    indices_tuple=None, settings: Mapping[str, object] | None = None,
) -> tuple[list[int], list[int] | None]:  # fmt: skip
    """Validate this rank's batch and agree on it, and on the loss's settings, with the other
    ranks.

    Returns the batch sizes of all ranks and, when some rank passed an ``indices_tuple``, the
    number of mined indices of each rank (``flat_mined_indices``; 0 where a rank passed none),
    else ``None``. Every rank takes part in the exchange even when its own input is bad, so that
    a bad batch on one rank raises ``ValueError`` on all ranks instead of leaving the others
    hanging in a collective.

    ``settings`` (name → value, see :func:`comparable_setting`) must be equal on every rank: a
    fingerprint of them rides in the same all-gather, and when they differ every rank raises
    the same ``ValueError`` naming each differing setting with every rank's value (this takes
    precedence over batch errors, which differing settings such as ``embedding_size`` cause).
    """
    settings = {name: comparable_setting(value) for name, value in (settings or {}).items()}
    error = None
    num_mined = -1
    try:
        if indices_tuple is not None:
            num_mined = len(flat_mined_indices(indices_tuple, embeddings.shape[0]))
        check_embeddings(embeddings)
        if embeddings.shape[1] != embedding_size:
            raise ValueError(
                f"embeddings have dimension {embeddings.shape[1]}, expected {embedding_size}"
            )
        check_labels(labels, num_classes, embeddings.shape[0])
        if embeddings.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"embeddings must be one of {_FLOAT_DTYPES}, got {embeddings.dtype}")
    except (TypeError, ValueError) as caught:
        error = caught
    if error is None:
        info = [embeddings.shape[0], _FLOAT_DTYPES.index(embeddings.dtype), 0, num_mined]
    else:
        info = [0, 0, 1, -1]
    info.append(_settings_digest(settings))
    mine = torch.tensor(info, dtype=torch.int64, device=device)
    table = [torch.empty_like(mine) for _ in range(world_size(group))]
    dist.all_gather(table, mine, group=group)
    table = torch.stack(table).cpu().tolist()
    if len({row[4] for row in table}) > 1:
        raise ValueError(
            "the ranks' class-parallel losses differ; every rank must build the same loss: "
            + _settings_mismatch(settings, group)
        )
    if error is not None:
        raise error
    bad_ranks = [index for index, row in enumerate(table) if row[2]]
    if bad_ranks:
        raise ValueError(
            f"invalid embeddings, labels or indices_tuple on rank(s) {bad_ranks}; see their errors"
        )
    dtypes = {_FLOAT_DTYPES[row[1]] for row in table}
    if len(dtypes) > 1:
        raise ValueError(
            f"embeddings have different dtypes across ranks: {sorted(map(str, dtypes))}"
        )
    mined = [row[3] for row in table]
    return [row[0] for row in table], (
        [max(0, count) for count in mined] if max(mined) >= 0 else None
    )
