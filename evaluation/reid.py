"""Re-ID retrieval metrics under the camera-aware protocol: CMC, mAP and mINP.

Definition (the "market1501" protocol of torchreid and fast-reid). For each query, gallery
items are ranked by ascending distance; equal distances keep gallery-index order (a stable
sort). Items with the query's pid *and* camid are removed; same-camera items of other pids
stay. A query left with no positive (same pid, other camera) is skipped. With ``r_k`` the
1-based kept rank of the k-th positive and ``npos`` the number of positives:

- CMC@k: 1 if ``r_1 <= k``, averaged over valid queries (``cmc[k - 1]``);
- AP = (1/npos) Σ_k k / r_k (non-interpolated), mAP its mean over valid queries;
- INP = npos / r_npos, mINP its mean over valid queries.

The CUHK03 single-gallery-shot protocol (``protocol="cuhk03"``) samples, per query and repeat,
one kept gallery item of each pid and averages the CMC over the repeats; AP still uses the full
list. Sampling is driven by ``numpy.random.default_rng(seed)``: for each valid query in order,
one ``rng.random((num_repeats, num_gallery_pids))`` draw, the item of a pid being
``floor(u · n)`` in gallery-index order among the n kept items of that pid.

Ranks are counted, not sorted: see :mod:`evaluation._reid_ranking`. Features are turned into
distances one block of queries at a time (torch, on the GPU when one is available), so memory
stays bounded by ``block_bytes`` whatever the gallery size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ._reid_ranking import count_positives, positive_ranks_block
from ._validation import check_features, check_ids
from .knn import l2_normalize

METRICS = ("euclidean", "cosine")
PROTOCOLS = ("market1501", "cuhk03")
# Size of one block of the query x gallery distance matrix when evaluating from features.
DEFAULT_BLOCK_BYTES = 128 * 2**20


@dataclass(frozen=True)
class ReIDResult:
    """Metrics of one evaluation; ``average_precision`` is per query, NaN where skipped."""

    cmc: np.ndarray
    mAP: float
    mINP: float
    average_precision: np.ndarray
    num_valid_queries: int
    num_skipped_queries: int

    def rank(self, k: int) -> float:
        """Rank-k accuracy (``cmc[k - 1]``)."""
        return float(self.cmc[k - 1])

    def to_dict(self) -> dict:
        return {
            "mAP": self.mAP,
            "mINP": self.mINP,
            "cmc": self.cmc.tolist(),
            "num_valid_queries": self.num_valid_queries,
            "num_skipped_queries": self.num_skipped_queries,
        }


def evaluate_reid(
    query_features,
    gallery_features,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    metric: str = "euclidean",
    max_rank: int = 50,
    *,
    protocol: str = "market1501",
    num_repeats: int = 10,
    seed: int = 0,
    device=None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> ReIDResult:
    """CMC, mAP and mINP of query features against gallery features (see the module docstring).

    ``metric="euclidean"`` is torchreid's squared euclidean distance on the raw features,
    ``‖q‖² + ‖g‖² − 2 q·g``; ``metric="cosine"`` is ``1 − q̂·ĝ`` on L2-normalised features.
    Distances are computed in the features' precision (float16 is widened to float32) with
    torch on ``device`` (default: CUDA when available, else CPU), one block of queries of at
    most ``block_bytes`` at a time, each block counted as soon as it is computed.
    """
    query = check_features(query_features, "query_features")
    gallery = check_features(gallery_features, "gallery_features")
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"query_features have dimension {query.shape[1]} but gallery_features have "
            f"{gallery.shape[1]}"
        )
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if block_bytes <= 0:
        raise ValueError(f"block_bytes must be positive, got {block_bytes}")
    ids = _check_protocol_ids(q_pids, g_pids, q_camids, g_camids, len(query), len(gallery))
    block_rows = max(1, block_bytes // (len(gallery) * query.itemsize))
    blocks = distance_blocks(query, gallery, metric, device=device, block_rows=block_rows)
    return _evaluate_blocks(blocks, *ids, max_rank, protocol, num_repeats, seed)


def evaluate_reid_from_distances(
    distmat,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    max_rank: int = 50,
    *,
    protocol: str = "market1501",
    num_repeats: int = 10,
    seed: int = 0,
) -> ReIDResult:
    """CMC, mAP and mINP from a (num_query, num_gallery) distance matrix, smaller is closer."""
    distances = check_features(distmat, "distmat")
    ids = _check_protocol_ids(q_pids, g_pids, q_camids, g_camids, *distances.shape)
    blocks = iter([(0, distances)])
    return _evaluate_blocks(blocks, *ids, max_rank, protocol, num_repeats, seed)


def pairwise_distances(query_features, gallery_features, metric: str = "euclidean", device=None):
    """The full (num_query, num_gallery) distance matrix of :func:`evaluate_reid`, as numpy.

    For small problems, plots and tests; the evaluator itself never holds this matrix whole.
    """
    query = check_features(query_features, "query_features")
    gallery = check_features(gallery_features, "gallery_features")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return np.concatenate([block for _, block in distance_blocks(query, gallery, metric, device)])


def distance_blocks(
    query: np.ndarray,
    gallery: np.ndarray,
    metric: str,
    device=None,
    block_rows: int | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_query_row, distances)`` for consecutive blocks of ``block_rows`` queries."""
    import torch

    device = torch.device(
        device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if metric == "cosine":
        query, gallery = l2_normalize(query), l2_normalize(gallery)
    gallery_t = torch.from_numpy(np.ascontiguousarray(gallery)).to(device)
    gallery_sq = (gallery_t * gallery_t).sum(1) if metric == "euclidean" else None
    block_rows = len(query) if block_rows is None else block_rows
    for first in range(0, len(query), block_rows):
        block = torch.from_numpy(np.ascontiguousarray(query[first : first + block_rows]))
        block = block.to(device)
        if metric == "euclidean":
            distances = (block * block).sum(1, keepdim=True) + gallery_sq
            distances.addmm_(block, gallery_t.T, alpha=-2)
        else:
            distances = torch.addmm(
                torch.ones((), dtype=block.dtype, device=device), block, gallery_t.T, alpha=-1
            )
        yield first, distances.cpu().numpy()


def _check_protocol_ids(q_pids, g_pids, q_camids, g_camids, num_query, num_gallery):
    if num_query == 0:
        raise ValueError("the query set is empty")
    if num_gallery == 0:
        raise ValueError("the gallery is empty")
    return (
        check_ids(q_pids, "q_pids", num_query),
        check_ids(g_pids, "g_pids", num_gallery),
        check_ids(q_camids, "q_camids", num_query),
        check_ids(g_camids, "g_camids", num_gallery),
    )


def _evaluate_blocks(
    blocks, q_pids, g_pids, q_camids, g_camids, max_rank, protocol, num_repeats, seed
) -> ReIDResult:
    if isinstance(max_rank, bool) or not isinstance(max_rank, (int, np.integer)) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "cuhk03" and (not isinstance(num_repeats, int) or num_repeats < 1):
        raise ValueError(f"num_repeats must be a positive integer, got {num_repeats!r}")
    max_rank = min(int(max_rank), len(g_pids))

    pid_order = np.argsort(g_pids, kind="stable")
    sorted_pids = g_pids[pid_order]
    group_starts = np.searchsorted(sorted_pids, q_pids, side="left")
    group_ends = np.searchsorted(sorted_pids, q_pids, side="right")
    num_positives = count_positives(group_starts, group_ends, q_camids, pid_order, g_camids)
    valid = num_positives > 0
    if not valid.any():
        raise ValueError(
            "no query has a positive: no gallery item shares a query's pid under another camera"
        )
    offsets = np.concatenate([[0], np.cumsum(num_positives)])
    ranks = np.empty(offsets[-1], dtype=np.int64)
    sampler = _SingleShotSampler(sorted_pids, pid_order, g_camids, num_repeats, seed)
    single_shot_ranks = []

    for first, distances in blocks:
        rows = slice(first, first + len(distances))
        block_offsets = offsets[first : first + len(distances) + 1]
        positive_ranks_block(
            distances,
            group_starts[rows],
            group_ends[rows],
            q_camids[rows],
            pid_order,
            g_camids,
            ranks[block_offsets[0] : block_offsets[-1]],
            block_offsets - block_offsets[0],
        )
        if protocol == "cuhk03":
            for query in np.flatnonzero(valid[rows]):
                single_shot_ranks.append(
                    sampler.ranks(distances[query], q_pids[first + query], q_camids[first + query])
                )

    # Rank k (1-based) of each positive within its query, for AP = mean over k of k / r_k.
    within = np.arange(len(ranks)) - np.repeat(offsets[:-1], num_positives) + 1
    valid_starts = offsets[:-1][valid]
    average_precision = np.full(len(q_pids), np.nan)
    average_precision[valid] = np.add.reduceat(within / ranks, valid_starts) / num_positives[valid]
    inverse_negative_penalty = num_positives[valid] / ranks[offsets[1:][valid] - 1]
    if protocol == "cuhk03":
        cmc = _cmc(np.concatenate(single_shot_ranks), max_rank)
    else:
        cmc = _cmc(ranks[valid_starts], max_rank)
    return ReIDResult(
        cmc=cmc,
        mAP=float(average_precision[valid].mean()),
        mINP=float(inverse_negative_penalty.mean()),
        average_precision=average_precision,
        num_valid_queries=int(valid.sum()),
        num_skipped_queries=int((~valid).sum()),
    )


def _cmc(first_ranks: np.ndarray, max_rank: int) -> np.ndarray:
    """Fraction of first-positive ranks within k, for k = 1..max_rank."""
    hits = np.bincount(np.minimum(first_ranks, max_rank + 1) - 1, minlength=max_rank + 1)
    return np.cumsum(hits[:max_rank]) / len(first_ranks)


class _SingleShotSampler:
    """CUHK03 single-gallery-shot ranks: one kept item per gallery pid, per repeat."""

    def __init__(self, sorted_pids, pid_order, g_camids, num_repeats, seed):
        self.unique_pids, self.group_starts, self.group_sizes = np.unique(
            sorted_pids, return_index=True, return_counts=True
        )
        self.pid_order, self.g_camids = pid_order, g_camids
        self.num_repeats = num_repeats
        self.rng = np.random.default_rng(seed)

    def ranks(self, row: np.ndarray, pid: int, camid: int) -> np.ndarray:
        """Rank of the sampled positive among the sampled items, one per repeat."""
        draws = self.rng.random((self.num_repeats, len(self.unique_pids)))
        own = np.searchsorted(self.unique_pids, pid)
        start = self.group_starts[own]
        group = self.pid_order[start : start + self.group_sizes[own]]
        positives = group[self.g_camids[group] != camid]
        sampled = self.pid_order[self.group_starts + (draws * self.group_sizes).astype(np.int64)]
        positive = positives[(draws[:, own] * len(positives)).astype(np.int64)]
        sampled_distances, positive_distances = row[sampled], row[positive][:, None]
        before = (sampled_distances < positive_distances) | (
            (sampled_distances == positive_distances) & (sampled < positive[:, None])
        )
        before[:, own] = False
        return before.sum(1) + 1
