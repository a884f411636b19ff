"""How classes (or gallery items) are split into contiguous per-rank slices."""

from __future__ import annotations


def shard_bounds(num_items: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s contiguous slice of ``num_items`` items.

    The first ``num_items % world_size`` ranks hold one item more than the others, so slice sizes
    differ by at most one and concatenating the slices in rank order gives ``range(num_items)``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size - 1}], got {rank}")
    if num_items < 0:
        raise ValueError(f"num_items must be non-negative, got {num_items}")
    base, remainder = divmod(num_items, world_size)
    start = rank * base + min(rank, remainder)
    return start, start + base + (rank < remainder)
