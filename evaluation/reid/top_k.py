"""CMC from a FAISS top-k search, and what top-k cannot give.

CMC@k only needs the first positive among the first ``max_rank`` kept items, so an exact flat
FAISS search (:func:`evaluation.knn.top_k`, on a GPU when faiss-gpu and a GPU are present) for
``max_rank`` plus the largest number of junk items of any query is enough: junk removal can
push at most that many items out of the way. AP and INP are different: they need the rank of
*every* positive, and the last positive can sit anywhere in the gallery (mINP is exactly about
that one), so a top-k list would truncate them; GPU FAISS also caps k at 2048.
:func:`evaluation.reid.evaluate_reid` therefore stays exact for mAP and mINP by counting, for
every positive, the kept items before it over whole distance rows (one compiled pass per row),
never by top-k. :func:`reranking_candidates` gives the joint query-and-gallery neighbour lists
(those query expansion uses), by the same exact search; k-reciprocal re-ranking orders its own
lists by the exact float64 distance (:mod:`evaluation.reid.rerank`).

FAISS computes its own distances (its L2 formula differs from torch's in the last bits) and
orders equal scores its own way, so near-ties can rank differently from ``evaluate_reid``.
"""

from __future__ import annotations

import numpy as np

from ..defaults import DEFAULT_MAX_RANK, DEFAULT_REID_METRIC
from ..knn import search_device, top_k
from ..validation import (
    ArrayLike,
    DeviceLike,
    check_features,
    check_positive_integer,
    check_protocol_ids,
    check_same_dimension,
    check_valid_queries,
)

_FAISS_METRICS = {"euclidean": "l2", "cosine": "cosine"}


def cmc_from_top_k(
    query_features: ArrayLike,
    gallery_features: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    metric: str = DEFAULT_REID_METRIC,
    max_rank: int = DEFAULT_MAX_RANK,
    device: DeviceLike = None,
    *,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, int]:
    """``(cmc, num_valid_queries)`` of the camera-aware protocol from exact FAISS top-k lists,
    searched on ``device`` (:func:`evaluation.knn.search_device`; ``use_gpu=`` is deprecated)."""
    device = search_device(device, use_gpu)
    if metric not in _FAISS_METRICS:
        raise ValueError(f"metric must be one of {tuple(_FAISS_METRICS)}, got {metric!r}")
    query = check_features(query_features, "query_features")
    gallery = check_features(gallery_features, "gallery_features")
    q_pids, g_pids, q_camids, g_camids = check_protocol_ids(
        q_pids, g_pids, q_camids, g_camids, len(query), len(gallery)
    )
    max_rank = min(check_positive_integer(max_rank, "max_rank"), len(gallery))

    junk_counts = _matching_counts(q_pids, q_camids, g_pids, g_camids)
    valid = check_valid_queries(
        _matching_counts(q_pids, 0 * q_camids, g_pids, 0 * g_camids) - junk_counts
    )
    k = min(len(gallery), max_rank + int(junk_counts.max()))
    _, indices = top_k(query, gallery, k, metric=_FAISS_METRICS[metric], device=device)

    hits = np.zeros(max_rank)
    for query_index in np.flatnonzero(valid):
        neighbours = indices[query_index]
        neighbours = neighbours[neighbours >= 0]
        junk = (g_pids[neighbours] == q_pids[query_index]) & (
            g_camids[neighbours] == q_camids[query_index]
        )
        matches = (g_pids[neighbours] == q_pids[query_index])[~junk][:max_rank]
        if matches.any():
            hits[np.argmax(matches) :] += 1
    return hits / valid.sum(), int(valid.sum())


def reranking_candidates(
    query_features: ArrayLike,
    gallery_features: ArrayLike,
    k: int,
    metric: str = DEFAULT_REID_METRIC,
    device: DeviceLike = None,
    *,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-ranking candidates: ``(distances, indices)``, each of shape (num_query + num_gallery, k).

    Row ``i`` lists the ``k`` items of the joint set (queries first, then gallery items, so
    gallery item ``j`` is ``num_query + j``) nearest to item ``i`` of that set, nearest first,
    the item itself included: the k-nearest-neighbour lists of the joint set, in FAISS's float32
    order (k-reciprocal re-ranking builds its own, in exact order). Distances are the evaluator's (``"euclidean"``: squared
    euclidean on raw features; ``"cosine"``: ``1 - cos``) as FAISS computes them in float32,
    searched on ``device`` (:func:`evaluation.knn.search_device`; ``use_gpu=`` is deprecated).
    """
    device = search_device(device, use_gpu)
    if metric not in _FAISS_METRICS:
        raise ValueError(f"metric must be one of {tuple(_FAISS_METRICS)}, got {metric!r}")
    query = check_features(query_features, "query_features")
    gallery = check_features(gallery_features, "gallery_features")
    check_same_dimension(query, gallery, "query_features", "gallery_features")
    joint = np.concatenate([query, gallery]).astype(np.float32, copy=False)
    return joint_nearest_neighbours(joint, k, metric, device)


def joint_nearest_neighbours(
    joint: np.ndarray, k: int, metric: str = DEFAULT_REID_METRIC, device: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`reranking_candidates` on the already stacked (queries, then gallery) features;
    ``device`` as :func:`evaluation.knn.search_device` returns it."""
    if metric not in _FAISS_METRICS:
        raise ValueError(f"metric must be one of {tuple(_FAISS_METRICS)}, got {metric!r}")
    scores, indices = top_k(joint, joint, k, metric=_FAISS_METRICS[metric], device=device)
    distances = -scores if metric == "euclidean" else 1 - scores
    return distances, indices


def _matching_counts(q_pids, q_camids, g_pids, g_camids) -> np.ndarray:
    """Per query, the gallery items with its pid and camid (no query x gallery matrix)."""
    low = min(q_camids.min(), g_camids.min())
    span = max(q_camids.max(), g_camids.max()) - low + 1
    gallery_keys = np.sort(g_pids * span + (g_camids - low))
    query_keys = q_pids * span + (q_camids - low)
    return np.searchsorted(gallery_keys, query_keys, "right") - np.searchsorted(
        gallery_keys, query_keys, "left"
    )
