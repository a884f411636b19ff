"""Re-ID retrieval under the camera-aware protocol (docs/theory.md §5).

- :mod:`evaluation.reid.protocol`: :func:`evaluate_reid` (from features, blocked),
  :func:`evaluate_reid_from_distances`, :class:`ReIDResult`, :func:`pairwise_distances`.
- :mod:`evaluation.reid.top_k`: CMC from FAISS top-k lists and re-ranking candidates.
- :mod:`evaluation.reid.rerank`: sparse k-reciprocal re-ranking (docs/theory.md §8).
- :mod:`evaluation.reid.query_expansion`: average QE and α-QE (docs/theory.md §9).
"""

from .distances import DEFAULT_BLOCK_BYTES, METRICS, DistanceBlocks, pairwise_distances
from .protocol import (
    PROTOCOLS,
    ReIDResult,
    evaluate_reid,
    evaluate_reid_from_distances,
    result_from_positive_ranks,
)
from .query_expansion import QueryExpansionOptions, expand_queries
from .rerank import CONVENTIONS, KReciprocalOptions, k_reciprocal_rerank
from .top_k import cmc_from_top_k, reranking_candidates

__all__ = [
    "CONVENTIONS",
    "DEFAULT_BLOCK_BYTES",
    "METRICS",
    "PROTOCOLS",
    "DistanceBlocks",
    "KReciprocalOptions",
    "QueryExpansionOptions",
    "ReIDResult",
    "cmc_from_top_k",
    "evaluate_reid",
    "evaluate_reid_from_distances",
    "expand_queries",
    "k_reciprocal_rerank",
    "pairwise_distances",
    "reranking_candidates",
    "result_from_positive_ranks",
]
