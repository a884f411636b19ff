"""Compiled steps of sparse k-reciprocal re-ranking (docs/theory.md §8).

Sets are CSR lists: row ``i`` of a set family is ``indices[indptr[i]:indptr[i + 1]]``. Every
kernel works on neighbour lists and these sparse rows only, never on an (N, N) matrix; the one
dense array is a block of query rows against the gallery, filled by :func:`jaccard_block`.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True)
def reciprocal_sets(neighbours, k):
    """``R(i, k)``: the items ``j`` among the ``k + 1`` nearest of ``i`` that have ``i`` among
    their own ``k + 1`` nearest, in ``i``'s neighbour order. Returns ``(indptr, indices)``."""
    num_items = neighbours.shape[0]
    keep = np.zeros((num_items, k + 1), dtype=np.bool_)
    counts = np.zeros(num_items + 1, dtype=np.int64)
    for item in prange(num_items):
        for position in range(k + 1):
            other = neighbours[item, position]
            for back in range(k + 1):
                if neighbours[other, back] == item:
                    keep[item, position] = True
                    counts[item + 1] += 1
                    break
    indptr = np.cumsum(counts)
    indices = np.empty(indptr[-1], dtype=np.int64)
    for item in prange(num_items):
        filled = indptr[item]
        for position in range(k + 1):
            if keep[item, position]:
                indices[filled] = neighbours[item, position]
                filled += 1
    return indptr, indices


@njit(cache=True)
def _expand_one(item, r_ptr, r_idx, h_ptr, h_idx, in_reciprocal, in_expanded, out, fill):
    """Writes the expanded set of ``item`` (unsorted) into ``out`` when ``fill``; returns its size.

    ``in_reciprocal`` / ``in_expanded`` are stamp arrays: ``stamp[j] == item`` marks membership.
    """
    size = 0
    for position in range(r_ptr[item], r_ptr[item + 1]):
        member = r_idx[position]
        in_reciprocal[member] = item
        if in_expanded[member] != item:
            in_expanded[member] = item
            if fill:
                out[size] = member
            size += 1
    for position in range(r_ptr[item], r_ptr[item + 1]):
        candidate = r_idx[position]
        half_size = h_ptr[candidate + 1] - h_ptr[candidate]
        overlap = 0
        for half_position in range(h_ptr[candidate], h_ptr[candidate + 1]):
            if in_reciprocal[h_idx[half_position]] == item:
                overlap += 1
        # overlap > 2/3 * half_size, in integers (equal to the float test for every size).
        if 3 * overlap > 2 * half_size:
            for half_position in range(h_ptr[candidate], h_ptr[candidate + 1]):
                member = h_idx[half_position]
                if in_expanded[member] != item:
                    in_expanded[member] = item
                    if fill:
                        out[size] = member
                    size += 1
    return size


@njit(cache=True)
def expanded_sets(r_ptr, r_idx, h_ptr, h_idx):
    """``R*(i)``: ``R(i, k1)`` plus every ``R(c, k1/2)`` of a candidate ``c`` in it that shares
    more than 2/3 of its members with ``R(i, k1)``; sorted, without duplicates."""
    num_items = r_ptr.shape[0] - 1
    in_reciprocal = np.full(num_items, -1, dtype=np.int64)
    in_expanded = np.full(num_items, -1, dtype=np.int64)
    no_output = np.empty(0, dtype=np.int64)
    counts = np.zeros(num_items + 1, dtype=np.int64)
    for item in range(num_items):
        counts[item + 1] = _expand_one(
            item, r_ptr, r_idx, h_ptr, h_idx, in_reciprocal, in_expanded, no_output, False
        )
    indptr = np.cumsum(counts)
    indices = np.empty(indptr[-1], dtype=np.int64)
    in_reciprocal[:] = -1
    in_expanded[:] = -1
    for item in range(num_items):
        start, end = indptr[item], indptr[item + 1]
        _expand_one(
            item, r_ptr, r_idx, h_ptr, h_idx, in_reciprocal, in_expanded, indices[start:end], True
        )
        indices[start:end] = np.sort(indices[start:end])
    return indptr, indices


@njit(cache=True, inline="always")
def pair_distance(features, norms, first, second, cosine):
    """The evaluator's distance of two rows, accumulated in float64: ``‖x − y‖²`` or
    ``1 − cos``."""
    total = 0.0
    if cosine:
        for dim in range(features.shape[1]):
            total += np.float64(features[first, dim]) * np.float64(features[second, dim])
        return 1.0 - total / (norms[first] * norms[second])
    for dim in range(features.shape[1]):
        difference = np.float64(features[first, dim]) - np.float64(features[second, dim])
        total += difference * difference
    return total


@njit(cache=True, parallel=True)
def exact_nearest(features, norms, candidates, k, cosine):
    """Per row, the ``k`` candidate columns nearest by the exact (float64) distance, nearest
    first; equal distances in column order (a stable argsort of the row would give the same).
    ``candidates`` (rows, >= k) come from a float32 pass and hold distinct columns."""
    nearest = np.empty((candidates.shape[0], k), dtype=np.int64)
    for item in prange(candidates.shape[0]):
        distances = np.empty(candidates.shape[1])
        for position in range(candidates.shape[1]):
            distances[position] = pair_distance(
                features, norms, item, candidates[item, position], cosine
            )
        # Sort by column first, so that the stable sort by distance breaks ties by column.
        by_column = np.argsort(candidates[item])
        order = np.argsort(distances[by_column], kind="mergesort")
        for position in range(k):
            nearest[item, position] = candidates[item, by_column[order[position]]]
    return nearest


@njit(cache=True, parallel=True)
def row_maxima(features, norms, candidates, cosine):
    """Per row, the largest exact distance to any of its candidate columns."""
    maxima = np.empty(candidates.shape[0])
    for item in prange(candidates.shape[0]):
        best = -np.inf
        for position in range(candidates.shape[1]):
            best = max(
                best, pair_distance(features, norms, item, candidates[item, position], cosine)
            )
        maxima[item] = best
    return maxima


@njit(cache=True, parallel=True)
def gaussian_weights(features, norms, indptr, indices, scales, power, cosine):
    """``V[i, j] = exp(-D_ij) / Σ_{j' ∈ R*(i)} exp(-D_ij')`` on the expanded sets, with
    ``D_ij = b(i, j)^power / scales[i]`` (``scales[i]`` the largest ``b(i, ·)^power``)."""
    weights = np.empty(indices.shape[0])
    for item in prange(indptr.shape[0] - 1):
        total = 0.0
        for position in range(indptr[item], indptr[item + 1]):
            distance = pair_distance(features, norms, item, indices[position], cosine)
            weight = np.exp(-(distance**power) / scales[item])
            weights[position] = weight
            total += weight
        for position in range(indptr[item], indptr[item + 1]):
            weights[position] /= total
    return weights


@njit(cache=True, parallel=True)
def jaccard_block(
    first,
    q_ptr,
    q_idx,
    q_val,
    column_ptr,
    column_rows,
    column_val,
    products,
    query_offsets,
    gallery_offsets,
    product_scale,
    final,
    scales,
    power,
    lambda_value,
):
    """Final distances of the query rows ``first ..`` against the gallery, written into ``final``.

    ``final`` (rows, G) enters zeroed. The evaluator's distance ``b`` of query row ``r`` and
    gallery item ``j`` is ``(query_offsets[r] + gallery_offsets[j]) + product_scale *
    products[r, j]`` in the products' precision (the ranking kernel's formula). For each query,
    the gallery items sharing a support column ``k`` with it are read from the gallery's column
    lists and ``s_ij = Σ_k min(V_ik, V_jk)`` is accumulated; then
    ``(1 − λ)(1 − s/(2 − s)) + λ b^power / scales[i]`` replaces it (``s = 0`` gives ``J = 1``).
    """
    for row in prange(final.shape[0]):
        query = first + row
        for position in range(q_ptr[query], q_ptr[query + 1]):
            column = q_idx[position]
            value = q_val[position]
            for entry in range(column_ptr[column], column_ptr[column + 1]):
                final[row, column_rows[entry]] += min(value, column_val[entry])
        scale = scales[query]
        for gallery_index in range(final.shape[1]):
            shared = final[row, gallery_index]
            jaccard = 1.0 - shared / (2.0 - shared)
            original = (
                query_offsets[row] + gallery_offsets[gallery_index]
            ) + product_scale * products[row, gallery_index]
            distance = np.float64(original) ** power / scale
            final[row, gallery_index] = (1.0 - lambda_value) * jaccard + lambda_value * distance
