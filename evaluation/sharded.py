"""Evaluation with the gallery split across the ranks of a torch.distributed process group.

Every rank holds all queries and its own contiguous slice of the gallery, in rank order (rank 0
holds gallery items 0..n_0-1, and so on); results are identical on every rank.

- :func:`sharded_top_k`: the k closest gallery items of each query over all shards (1:N
  identification, CMC from retrieval lists): local exact search, then a merge of the ranks'
  candidates, ties broken by the global gallery index.
- :func:`sharded_reid_from_distances`: exact re-ID CMC / mAP / mINP (market1501 protocol) by
  counting. The positives of each query (same pid, other camera; few) are gathered from all
  shards; each rank counts, per positive, its kept negatives that come before it (smaller
  distance, or equal distance and smaller global index), and one all-reduce sums the counts.
  The kept rank of positive k is then ``negatives before + k + 1``: no rank ever holds the
  whole distance row, and the result equals single-process evaluation on the full matrix.

A shard may be empty (a gallery smaller than the world size). Each function first checks its
own rank's input and exchanges the outcome, with the shard sizes and the settings that must
agree (query count, ``k``, ...), in one all-gather before any other collective: bad input on
one rank raises ``ValueError`` on every rank instead of leaving the others waiting.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
import torch.distributed as dist
from numba import njit, prange
from numpy.typing import ArrayLike

from .defaults import DEFAULT_MAX_RANK
from .knn import METRICS, search_device, top_k
from .reid._ranking_kernel import positives_before
from .reid.protocol import ReIDResult, result_from_positive_ranks
from .validation import DeviceLike, check_features, check_ids, check_positive_integer, to_numpy


def _collective_device(group):
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_array(array: np.ndarray, group) -> list[np.ndarray]:
    """Every rank's array of the same shape and dtype, in rank order."""
    tensor = torch.from_numpy(np.ascontiguousarray(array)).to(_collective_device(group))
    pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, tensor, group=group)
    return [piece.cpu().numpy() for piece in pieces]


def _all_reduce_array(array: np.ndarray, op, group) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(array)).to(_collective_device(group))
    dist.all_reduce(tensor, op=op, group=group)
    return tensor.cpu().numpy()


def _agree_on_shards(local_size: int, settings: dict[str, int], error, group) -> tuple[int, int]:
    """(global index of this rank's first gallery item, total gallery size), once every rank has
    reported its shard size, whether its input passed the checks (``error`` is ``None``), and
    ``settings`` that must be the same on every rank.

    Raises:
        ValueError: on every rank, when some rank's input is bad (that rank raises its own
            error) or a setting differs across ranks.
    """
    mine = np.array([local_size, error is not None, *settings.values()], dtype=np.int64)
    table = np.stack(_all_gather_array(mine, group))
    if error is not None:
        raise error
    bad_ranks = np.flatnonzero(table[:, 1]).tolist()
    if bad_ranks:
        raise ValueError(f"invalid input on rank(s) {bad_ranks}; see their errors")
    for column, name in enumerate(settings, start=2):
        if len(set(table[:, column].tolist())) > 1:
            raise ValueError(f"{name} differs across ranks: {table[:, column].tolist()}")
    sizes = table[:, 0]
    return int(sizes[: dist.get_rank(group)].sum()), int(sizes.sum())


def _digest(array: np.ndarray) -> int:
    """A checksum of an id vector's values, to compare replicated ids across ranks cheaply."""
    return zlib.crc32(np.ascontiguousarray(array, dtype=np.int64).tobytes())


def _check_local_distances(local_distances) -> np.ndarray:
    """A finite (num_query, num_local) floating-point matrix; num_local = 0 is an empty shard."""
    array = to_numpy(local_distances, "local_distances")
    if array.ndim == 2 and array.shape[1] == 0:
        # check_features refuses zero columns (no feature dimensions); here they are a shard
        # that holds no gallery items, which is legal.
        check_features(np.zeros((array.shape[0], 1), array.dtype), "local_distances")
        return array
    return check_features(array, "local_distances")


def sharded_top_k(
    queries: ArrayLike,
    local_gallery: ArrayLike,
    k: int,
    metric: str = "cosine",
    group: dist.ProcessGroup | None = None,
    device: DeviceLike = None,
    *,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` gallery items closest to each query over all shards: ``(scores, indices)``.

    Scores follow :func:`evaluation.knn.top_k` (larger is closer); indices are global gallery
    indices. Equal scores are ordered by global index. Same result on every rank. The local
    search runs on ``device`` (:func:`evaluation.knn.search_device`; ``use_gpu=`` is deprecated).
    """
    device = search_device(device, use_gpu)
    error, settings = None, dict.fromkeys(("number of queries", "dimension", "k", "metric"), 0)
    gallery = np.empty((0, 0))
    try:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        query_array = check_features(queries, "queries")
        gallery = check_features(local_gallery, "local_gallery", allow_empty=True)
        if gallery.shape[1] != query_array.shape[1]:
            raise ValueError(
                f"local_gallery has dimension {gallery.shape[1]} but the queries have "
                f"{query_array.shape[1]}"
            )
        k = check_positive_integer(k, "k")
        settings.update(
            {
                "number of queries": query_array.shape[0],
                "dimension": query_array.shape[1],
                "k": k,
                "metric": METRICS.index(metric),
            }
        )
    except ValueError as caught:
        error, gallery = caught, np.empty((0, 0))
    offset, total = _agree_on_shards(gallery.shape[0], settings, error, group)
    if not 1 <= k <= total:
        raise ValueError(f"k must lie in [1, {total}] (the whole gallery), got {k}")
    scores = np.full((query_array.shape[0], k), -np.inf, dtype=np.float32)
    indices = np.full((query_array.shape[0], k), np.iinfo(np.int64).max, dtype=np.int64)
    local_k = min(k, gallery.shape[0])
    if local_k:
        local_scores, local_indices = top_k(query_array, gallery, local_k, metric, device)
        scores[:, :local_k] = local_scores
        indices[:, :local_k] = local_indices + offset
    all_scores = np.concatenate(_all_gather_array(scores, group), axis=1)
    all_indices = np.concatenate(_all_gather_array(indices, group), axis=1)
    order = np.lexsort((all_indices, -all_scores), axis=-1)[:, :k]
    return np.take_along_axis(all_scores, order, 1), np.take_along_axis(all_indices, order, 1)


@njit(cache=True, parallel=True)
def _negatives_before_positives(
    distances, gallery_pids, index_offset, query_pids, positive_distances, positive_indices,
    num_positives, counts,
):  # fmt: skip
    """counts[q, k] = this shard's negatives (other pid) before query q's k-th sorted positive."""
    for query in prange(distances.shape[0]):
        count = num_positives[query]
        if count == 0:
            continue
        query_distances = positive_distances[query, :count]
        query_indices = positive_indices[query, :count]
        bins = np.zeros(count + 1, dtype=np.int64)
        for item in range(distances.shape[1]):
            if gallery_pids[item] != query_pids[query]:
                distance, index = distances[query, item], item + index_offset
                bins[positives_before(distance, index, query_distances, query_indices)] += 1
        running = 0
        for k in range(count):
            running += bins[k]
            counts[query, k] = running


def sharded_reid_from_distances(
    local_distances: ArrayLike,
    q_pids: ArrayLike,
    local_g_pids: ArrayLike,
    q_camids: ArrayLike,
    local_g_camids: ArrayLike,
    max_rank: int = DEFAULT_MAX_RANK,
    group: dist.ProcessGroup | None = None,
) -> ReIDResult:
    """Exact CMC, mAP and mINP (market1501 protocol, docs/theory.md §5) with the gallery sharded.

    ``local_distances`` (num_query, num_local): this rank's columns of the distance matrix, smaller
    is closer; ``local_g_pids`` / ``local_g_camids`` its gallery ids. Returns, on every rank, the
    :class:`evaluation.reid.ReIDResult` that :func:`evaluation.reid.evaluate_reid_from_distances`
    gives for the whole matrix (the same ranks go through the same final step).
    """
    names = ("number of queries", "max_rank", "q_pids (checksum)", "q_camids (checksum)")
    error, num_local, settings = None, 0, dict.fromkeys(names, 0)
    try:
        distances = _check_local_distances(local_distances)
        num_query, num_local = distances.shape
        q_pids = check_ids(q_pids, "q_pids", num_query)
        q_camids = check_ids(q_camids, "q_camids", num_query)
        g_pids = check_ids(local_g_pids, "local_g_pids", num_local)
        g_camids = check_ids(local_g_camids, "local_g_camids", num_local)
        max_rank = check_positive_integer(max_rank, "max_rank")
        values = (num_query, max_rank, _digest(q_pids), _digest(q_camids))
        settings.update(zip(names, values, strict=True))
    except ValueError as caught:
        error, num_local = caught, 0
    offset, total = _agree_on_shards(num_local, settings, error, group)

    is_positive = (q_pids[:, None] == g_pids[None, :]) & (q_camids[:, None] != g_camids[None, :])
    local_counts = is_positive.sum(axis=1)
    width = int(
        _all_reduce_array(np.array([local_counts.max(initial=0)]), dist.ReduceOp.MAX, group)[0]
    )
    # float64 holds every input dtype exactly and is the same on every rank.
    positive_distances = np.full((num_query, width), np.inf, dtype=np.float64)
    positive_indices = np.full((num_query, width), np.iinfo(np.int64).max, dtype=np.int64)
    rows, columns = np.nonzero(is_positive)
    slots = np.arange(len(rows)) - np.repeat(np.cumsum(local_counts) - local_counts, local_counts)
    positive_distances[rows, slots] = distances[rows, columns]
    positive_indices[rows, slots] = columns + offset
    positive_distances = np.concatenate(_all_gather_array(positive_distances, group), axis=1)
    positive_indices = np.concatenate(_all_gather_array(positive_indices, group), axis=1)
    order = np.lexsort((positive_indices, positive_distances), axis=-1)
    positive_distances = np.take_along_axis(positive_distances, order, 1)
    positive_indices = np.take_along_axis(positive_indices, order, 1)
    num_positives = _all_reduce_array(local_counts.astype(np.int64), dist.ReduceOp.SUM, group)

    counts = np.zeros(positive_distances.shape, dtype=np.int64)
    _negatives_before_positives(
        distances, g_pids, offset, q_pids,
        positive_distances, positive_indices, num_positives, counts,
    )  # fmt: skip
    counts = _all_reduce_array(counts, dist.ReduceOp.SUM, group)
    # Kept 1-based rank of each positive: the negatives before it plus the positives up to it.
    positions = np.arange(1, counts.shape[1] + 1)
    ranks = (counts + positions)[positions[None, :] <= num_positives[:, None]]
    return result_from_positive_ranks(ranks, num_positives, min(max_rank, total))
