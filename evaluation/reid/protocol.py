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

Ranks are counted, not sorted: see :mod:`evaluation.reid._ranking_kernel`. Features are turned into
distances one block of queries at a time (torch, on the GPU when one is available), so memory
stays bounded by ``block_bytes`` whatever the gallery size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .._deprecation import DeprecatedAlias
from ..defaults import (
    DEFAULT_CONFIDENCE,
    DEFAULT_MAX_RANK,
    DEFAULT_NUM_REPEATS,
    DEFAULT_NUM_RESAMPLES,
    DEFAULT_PROTOCOL,
    DEFAULT_REID_METRIC,
    DEFAULT_SEED,
    PROTOCOLS,
)
from ..validation import (
    ArrayLike,
    DeviceLike,
    check_feature_pair,
    check_features,
    check_positive_integer,
    check_protocol_ids,
    check_valid_queries,
    to_numpy,
)
from ._ranking_kernel import count_positives, positive_ranks_block
from .bootstrap import ReIDIntervals
from .distances import DEFAULT_BLOCK_BYTES, DistanceBlocks
from .query_expansion import QueryExpansionArgument
from .rerank import RerankArgument


@dataclass(frozen=True)
class ReIDResult:
    """Metrics of one evaluation; ``average_precision`` is per query, NaN where skipped.

    Per query too: ``inverse_negative_penalty`` (NaN where skipped) and ``first_positive_ranks``
    (num_query, num_repeats), the kept rank of the first positive that the CMC counts (one
    column for "market1501", one per repeat for "cuhk03"; 0 where skipped). ``query_pids`` and
    ``query_camids`` are set by the evaluators, which enables :meth:`per_camera`,
    :meth:`per_identity` and :meth:`bootstrap`; ``intervals`` holds a bootstrap's result when
    one was asked for.
    """

    cmc: np.ndarray
    mAP: float
    mINP: float
    average_precision: np.ndarray
    num_valid_queries: int
    num_skipped_queries: int
    inverse_negative_penalty: np.ndarray | None = None
    first_positive_ranks: np.ndarray | None = None
    query_pids: np.ndarray | None = None
    query_camids: np.ndarray | None = None
    intervals: object | None = None

    def rank(self, k: int) -> float:
        """Rank-k accuracy (``cmc[k - 1]``).

        Raises:
            ValueError: ``k`` is not an integer in ``[1, len(cmc)]`` (``len(cmc)`` is
                ``max_rank`` clipped to the gallery size).
        """
        if (
            isinstance(k, bool)
            or not isinstance(k, int | np.integer)
            or not 1 <= k <= len(self.cmc)
        ):
            raise ValueError(f"rank k must be an integer in [1, {len(self.cmc)}], got {k!r}")
        return float(self.cmc[k - 1])

    def per_camera(self) -> dict[int, dict]:
        """Rank-1, mAP, mINP and the number of valid queries, per query camera."""
        return self._breakdown(self.query_camids, "query_camids")

    def per_identity(self) -> dict[int, dict]:
        """Rank-1, mAP, mINP and the number of valid queries, per query identity."""
        return self._breakdown(self.query_pids, "query_pids")

    def _breakdown(self, groups: np.ndarray | None, name: str) -> dict[int, dict]:
        from .bootstrap import group_breakdown

        if groups is None:
            raise ValueError(f"this result carries no {name}: build it with evaluate_reid")
        return group_breakdown(self, groups)

    def bootstrap(
        self,
        num_resamples: int = DEFAULT_NUM_RESAMPLES,
        seed: int = DEFAULT_SEED,
        confidence: float = DEFAULT_CONFIDENCE,
    ) -> ReIDIntervals:
        """Percentile intervals of rank-k, mAP and mINP over query identities resampled with
        replacement (docs/theory.md §10); see :func:`evaluation.reid.bootstrap.bootstrap_reid`."""
        from .bootstrap import bootstrap_reid

        return bootstrap_reid(self, num_resamples, seed, confidence)

    def as_dict(self) -> dict:
        summary = {
            "mAP": self.mAP,
            "mINP": self.mINP,
            "cmc": self.cmc.tolist(),
            "num_valid_queries": self.num_valid_queries,
            "num_skipped_queries": self.num_skipped_queries,
        }
        if self.query_camids is not None:
            summary["per_camera"] = {str(c): row for c, row in self.per_camera().items()}
        if self.query_pids is not None:
            summary["per_identity"] = {str(p): row for p, row in self.per_identity().items()}
        if self.intervals is not None:
            summary["intervals"] = self.intervals.as_dict()
        return summary

    to_dict = DeprecatedAlias("as_dict")


def evaluate_reid(
    query_features: ArrayLike,
    gallery_features: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    metric: str = DEFAULT_REID_METRIC,
    max_rank: int = DEFAULT_MAX_RANK,
    *,
    protocol: str = DEFAULT_PROTOCOL,
    num_repeats: int = DEFAULT_NUM_REPEATS,
    seed: int = DEFAULT_SEED,
    device: DeviceLike = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    rerank: RerankArgument = None,
    query_expansion: QueryExpansionArgument = None,
    bootstrap: int | None = None,
) -> ReIDResult:
    """CMC, mAP and mINP of query features against gallery features (see the module docstring).

    ``metric="euclidean"`` is torchreid's squared euclidean distance on the raw features,
    ``‖q‖² + ‖g‖² − 2 q·g``; ``metric="cosine"`` is ``1 − q̂·ĝ`` on L2-normalised features.
    Distances are computed in the wider of the two features' precisions (float16 and bfloat16
    are widened to float32) with torch on ``device`` (default: CUDA when available, else CPU),
    one block of queries of at most ``block_bytes`` (a positive integer) at a time, each block
    counted as soon as it is computed. Features whose squared distances would overflow or
    underflow that precision are first divided by one common power of two (exact, so the ranks
    are those of exact-range arithmetic).

    ``rerank``: ``True``, a :class:`~evaluation.reid.rerank.KReciprocalOptions` or a dict of
    its fields ranks by the k-reciprocal re-ranked distance of docs/theory.md §8 instead
    (:func:`~evaluation.reid.rerank.k_reciprocal_rerank`, sparse and blocked).
    ``query_expansion``: ``"average"``, ``"alpha"``, a
    :class:`~evaluation.reid.query_expansion.QueryExpansionOptions` or a dict of its fields
    replaces the features by their query-expanded versions first (docs/theory.md §9).
    ``bootstrap``: a number of resamples attaches percentile intervals (95 %, query identities
    resampled, seeded by ``seed``; docs/theory.md §10) as ``result.intervals``.
    """
    query, gallery = check_feature_pair(
        check_features(query_features, "query_features"),
        check_features(gallery_features, "gallery_features"),
        "query_features",
        "gallery_features",
    )
    check_positive_integer(block_bytes, "block_bytes")
    ids = check_protocol_ids(q_pids, g_pids, q_camids, g_camids, len(query), len(gallery))
    blocks = _feature_blocks(query, gallery, metric, device, block_bytes, rerank, query_expansion)
    result = _evaluate_blocks(blocks, *ids, max_rank, protocol, num_repeats, seed)
    return _with_intervals(result, bootstrap, seed)


def _with_intervals(result: ReIDResult, bootstrap: int | None, seed: int) -> ReIDResult:
    if bootstrap is None:
        return result
    return replace(result, intervals=result.bootstrap(bootstrap, seed))


def _feature_blocks(
    query, gallery, metric, device, block_bytes, rerank, query_expansion
) -> DistanceBlocks:
    from .query_expansion import as_query_expansion_options, expand_queries
    from .rerank import as_rerank_options, k_reciprocal_rerank

    options = as_rerank_options(rerank)
    expansion = as_query_expansion_options(query_expansion)
    if expansion is not None:
        query, gallery = expand_queries(query, gallery, expansion, device)
    if options is not None:
        return k_reciprocal_rerank(
            query, gallery, metric, options, device=device, block_bytes=block_bytes
        )
    block_rows = max(1, block_bytes // (len(gallery) * query.itemsize))
    return DistanceBlocks.from_features(query, gallery, metric, device, block_rows)


def evaluate_reid_from_distances(
    distmat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    max_rank: int = DEFAULT_MAX_RANK,
    *,
    protocol: str = DEFAULT_PROTOCOL,
    num_repeats: int = DEFAULT_NUM_REPEATS,
    seed: int = DEFAULT_SEED,
    bootstrap: int | None = None,
) -> ReIDResult:
    """CMC, mAP and mINP from a (num_query, num_gallery) distance matrix, smaller is closer
    (``bootstrap`` as in :func:`evaluate_reid`)."""
    distances = to_numpy(distmat, "distmat")
    if distances.ndim == 2 and 0 in distances.shape:
        check_protocol_ids(q_pids, g_pids, q_camids, g_camids, *distances.shape)
    distances = check_features(distances, "distmat")
    ids = check_protocol_ids(q_pids, g_pids, q_camids, g_camids, *distances.shape)
    blocks = DistanceBlocks.from_distances(distances)
    result = _evaluate_blocks(blocks, *ids, max_rank, protocol, num_repeats, seed)
    return _with_intervals(result, bootstrap, seed)


def _evaluate_blocks(
    blocks, q_pids, g_pids, q_camids, g_camids, max_rank, protocol, num_repeats, seed
) -> ReIDResult:
    max_rank = min(check_positive_integer(max_rank, "max_rank"), len(g_pids))
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "cuhk03":
        check_positive_integer(num_repeats, "num_repeats")

    pid_order = np.argsort(g_pids, kind="stable")
    sorted_pids = g_pids[pid_order]
    group_starts = np.searchsorted(sorted_pids, q_pids, side="left")
    group_ends = np.searchsorted(sorted_pids, q_pids, side="right")
    num_positives = count_positives(group_starts, group_ends, q_camids, pid_order, g_camids)
    valid = check_valid_queries(num_positives)
    offsets = np.concatenate([[0], np.cumsum(num_positives)])
    ranks = np.empty(offsets[-1], dtype=np.int64)
    sampler = _SingleShotSampler(sorted_pids, pid_order, g_camids, num_repeats, seed)
    single_shot_ranks = []

    for first, products, query_offsets in blocks.blocks:
        rows = slice(first, first + len(products))
        block_offsets = offsets[first : first + len(products) + 1]
        positive_ranks_block(
            products,
            query_offsets,
            blocks.gallery_offsets,
            blocks.scale,
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
                distances = blocks.row(products[query], query_offsets[query])
                single_shot_ranks.append(
                    sampler.ranks(distances, q_pids[first + query], q_camids[first + query])
                )

    cmc_ranks = np.concatenate(single_shot_ranks) if protocol == "cuhk03" else None
    result = result_from_positive_ranks(ranks, num_positives, max_rank, cmc_ranks)
    return replace(result, query_pids=q_pids, query_camids=q_camids)


def result_from_positive_ranks(
    ranks: np.ndarray,
    num_positives: np.ndarray,
    max_rank: int,
    cmc_ranks: np.ndarray | None = None,
) -> ReIDResult:
    """The metrics from the kept 1-based rank of every positive (the protocol's last step).

    ``ranks`` holds, query by query, the ascending ranks of query ``i``'s ``num_positives[i]``
    positives (queries without positives contribute none); ``max_rank`` is already clipped to
    the gallery size. CMC counts ``cmc_ranks`` (default: each valid query's first positive;
    the CUHK03 protocol passes its single-shot ranks).
    """
    valid = check_valid_queries(num_positives)
    offsets = np.concatenate([[0], np.cumsum(num_positives)])
    # Rank k (1-based) of each positive within its query, for AP = mean over k of k / r_k.
    within = np.arange(len(ranks)) - np.repeat(offsets[:-1], num_positives) + 1
    valid_starts = offsets[:-1][valid]
    average_precision = np.full(len(num_positives), np.nan)
    average_precision[valid] = np.add.reduceat(within / ranks, valid_starts) / num_positives[valid]
    inverse_negative_penalty = num_positives[valid] / ranks[offsets[1:][valid] - 1]
    first_ranks = ranks[valid_starts] if cmc_ranks is None else cmc_ranks
    per_query_inp = np.full(len(num_positives), np.nan)
    per_query_inp[valid] = inverse_negative_penalty
    per_query_first = np.zeros((len(num_positives), len(first_ranks) // int(valid.sum())), np.int64)
    per_query_first[valid] = first_ranks.reshape(int(valid.sum()), -1)
    return ReIDResult(
        cmc=_cmc(first_ranks, max_rank),
        mAP=float(average_precision[valid].mean()),
        mINP=float(inverse_negative_penalty.mean()),
        average_precision=average_precision,
        num_valid_queries=int(valid.sum()),
        num_skipped_queries=int((~valid).sum()),
        inverse_negative_penalty=per_query_inp,
        first_positive_ranks=per_query_first,
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
