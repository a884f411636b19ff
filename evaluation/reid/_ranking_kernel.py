"""Compiled counting pass of the re-ID evaluator: positive ranks without sorting a row.

For one query, the kept gallery is every item except those sharing the query's pid and camid.
The kept rank of a positive is 1 + the kept items that come before it, where "before" means
a smaller distance, or an equal distance and a smaller gallery index (the tie rule). The
positives and the same-pid-same-camera junk of a query are gathered from the gallery indices
of its pid (listed once by the caller); a single pass over the distance row then bins every
gallery item by the number of positives that come before it, and the contributions of the
query's own pid group are taken back out afterwards. Cumulative bin counts give the number of
negatives before each positive, hence every positive's rank: exactly what AP, mINP and CMC need.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, inline="always")
def positives_before(distance, index, positive_distances, positive_indices):
    """How many of the sorted positives come before the item (distance, index)."""
    count = positive_distances.shape[0]
    if distance > positive_distances[count - 1]:
        return count
    if distance < positive_distances[0]:
        return 0
    low, high = 0, count
    while low < high:
        middle = (low + high) // 2
        middle_distance = positive_distances[middle]
        if middle_distance < distance or (
            middle_distance == distance and positive_indices[middle] < index
        ):
            low = middle + 1
        else:
            high = middle
    return low


@njit(cache=True, parallel=True)
def positive_ranks_block(
    products,
    query_offsets,
    gallery_offsets,
    scale,
    group_starts,
    group_ends,
    query_camids,
    pid_order,
    gallery_camids,
    ranks,
    offsets,
):
    """Kept 1-based ranks of every positive of each query of a block of rows.

    The distance of query ``i`` to gallery item ``j`` is
    ``(query_offsets[i] + gallery_offsets[j]) + scale * products[i, j]``, evaluated here in the
    products' precision, so that the norms of a squared euclidean distance are added in this pass
    rather than in one more pass over the block (zero offsets and ``scale=1`` read distances).

    ``pid_order`` lists the gallery indices grouped by pid (ascending index within a group);
    query ``i``'s pid group is ``pid_order[group_starts[i]:group_ends[i]]``. The ranks of query
    ``i``'s positives, ascending, are written to ``ranks[offsets[i]:offsets[i + 1]]``, where the
    caller sized ``offsets`` from the positive counts (see :func:`count_positives`).
    """
    num_queries, gallery_size = products.shape
    for query in prange(num_queries):
        start, end = offsets[query], offsets[query + 1]
        num_positives = end - start
        if num_positives == 0:
            continue
        row = (query_offsets[query] + gallery_offsets) + scale * products[query]
        group = pid_order[group_starts[query] : group_ends[query]]
        positive_indices = np.empty(num_positives, dtype=np.int64)
        junk_indices = np.empty(group.shape[0] - num_positives, dtype=np.int64)
        num_seen, num_junk = 0, 0
        for gallery_index in group:
            if gallery_camids[gallery_index] == query_camids[query]:
                junk_indices[num_junk] = gallery_index
                num_junk += 1
            else:
                positive_indices[num_seen] = gallery_index
                num_seen += 1
        positive_distances = row[positive_indices]
        # Stable sort: positives with equal distances stay in gallery-index order.
        order = np.argsort(positive_distances, kind="mergesort")
        positive_distances = positive_distances[order]
        positive_indices = positive_indices[order]

        bin_counts = np.zeros(num_positives + 1, dtype=np.int64)
        for gallery_index in range(gallery_size):
            bin_counts[
                positives_before(
                    row[gallery_index], gallery_index, positive_distances, positive_indices
                )
            ] += 1
        for k in range(num_positives):
            bin_counts[k] -= 1
        for junk_index in junk_indices:
            bin_counts[
                positives_before(row[junk_index], junk_index, positive_distances, positive_indices)
            ] -= 1

        negatives_before = 0
        for k in range(num_positives):
            negatives_before += bin_counts[k]
            ranks[start + k] = negatives_before + k + 1


@njit(cache=True)
def count_positives(group_starts, group_ends, query_camids, pid_order, gallery_camids):
    """Number of positives (same pid, other camera) of each query."""
    counts = np.zeros(group_starts.shape[0], dtype=np.int64)
    for query in range(group_starts.shape[0]):
        for position in range(group_starts[query], group_ends[query]):
            if gallery_camids[pid_order[position]] != query_camids[query]:
                counts[query] += 1
    return counts
