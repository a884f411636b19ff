"""Query expansion of re-ID features: average QE and α-QE, fast-reid's definitions (docs/theory.md §9).

Over the ``N = Q + G`` items of query and gallery together, with ``x`` the features as given and
``cos_ij`` the cosine similarity, each item is replaced by the weighted mean of the features of
its ``k`` most similar items (itself included, as the most similar):

    x'_i = (1/k) Σ_{j ∈ N_k(i)} cos_ij^α · x_j,

repeated ``times`` times (each round searching with the new features). ``α = 0`` is average
query expansion (plain mean); fast-reid's defaults are ``k = 5``, ``α = 3``, one round. The
features averaged are the raw ones, not their normalised versions, exactly as in fast-reid;
the result is then ranked by the evaluator's metric. Neighbours come from an exact FAISS cosine
search; the similarities used as weights are recomputed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..defaults import NAMED_EXPANSIONS
from ..knn import search_device
from ..validation import (
    ArrayLike,
    DeviceLike,
    check_features,
    check_positive_integer,
    check_same_dimension,
)
from .top_k import joint_nearest_neighbours


@dataclass(frozen=True)
class QueryExpansionOptions:
    """``k`` neighbours (itself included), weight exponent ``alpha`` (0: average QE), ``times``
    rounds.

    Raises:
        ValueError: ``k`` or ``times`` not a positive integer, ``alpha`` negative or not finite.
    """

    k: int = 5
    alpha: float = 3.0
    times: int = 1

    def __post_init__(self):
        check_positive_integer(self.k, "k")
        check_positive_integer(self.times, "times")
        if isinstance(self.alpha, bool) or not (np.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {self.alpha!r}")


#: What ``query_expansion=`` accepts (see :func:`as_query_expansion_options`).
QueryExpansionArgument = str | QueryExpansionOptions | dict | None


def as_query_expansion_options(
    query_expansion: QueryExpansionArgument,
) -> QueryExpansionOptions | None:
    """``query_expansion=`` of the evaluators: ``None`` (off), ``"average"`` (``α = 0``),
    ``"alpha"`` (``α = 3``), both with ``k = 5``; a :class:`QueryExpansionOptions`; or a dict
    of its fields."""
    if query_expansion is None:
        return None
    if isinstance(query_expansion, QueryExpansionOptions):
        return query_expansion
    if isinstance(query_expansion, dict):
        return QueryExpansionOptions(**query_expansion)
    if isinstance(query_expansion, str):
        if query_expansion not in NAMED_EXPANSIONS:
            raise ValueError(
                f"query_expansion must be one of {NAMED_EXPANSIONS}, got {query_expansion!r}"
            )
        return QueryExpansionOptions(alpha=0.0 if query_expansion == "average" else 3.0)
    raise TypeError(
        "query_expansion must be None, a name, a QueryExpansionOptions or a dict, got "
        f"{type(query_expansion).__name__}"
    )


def expand_queries(
    query_features: ArrayLike,
    gallery_features: ArrayLike,
    options: QueryExpansionOptions | None = None,
    device: DeviceLike = None,
    *,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(query, gallery)`` features after query expansion (see the module docstring), in the
    input's floating-point type. The neighbour search runs on ``device``
    (:func:`evaluation.knn.search_device`; ``use_gpu=`` is deprecated).

    Raises:
        ValueError: bad features, ``k`` above the number of items, a zero feature vector, or
            weights that are not finite (a negative similarity to a non-integer power).
    """
    options = QueryExpansionOptions() if options is None else options
    device = search_device(device, use_gpu)
    query = check_features(query_features, "query_features")
    gallery = check_features(gallery_features, "gallery_features")
    check_same_dimension(query, gallery, "query_features", "gallery_features")
    joint = np.concatenate([query, gallery])
    if options.k > len(joint):
        raise ValueError(f"k must lie in [1, {len(joint)}], got {options.k}")
    for _ in range(options.times):
        norms = np.sqrt(np.einsum("ij,ij->i", joint, joint, dtype=np.float64))
        if (norms == 0).any():
            raise ValueError("cannot L2-normalise a zero feature vector")
        _, neighbours = joint_nearest_neighbours(
            joint.astype(np.float32, copy=False), options.k, "cosine", device
        )
        expanded = np.empty_like(joint)
        _weighted_neighbour_means(joint, norms, neighbours, float(options.alpha), expanded)
        if not np.isfinite(expanded).all():
            raise ValueError(
                "query expansion produced non-finite features: a negative cosine similarity "
                f"to the power alpha={options.alpha}"
            )
        joint = expanded
    return joint[: len(query)], joint[len(query) :]


@njit(cache=True, parallel=True)
def _weighted_neighbour_means(features, norms, neighbours, alpha, out):
    """``out[i] = mean over t of cos(i, n_t)^alpha · features[n_t]``, accumulated in float64."""
    num_neighbours = neighbours.shape[1]
    for item in prange(features.shape[0]):
        total = np.zeros(features.shape[1])
        for position in range(num_neighbours):
            other = neighbours[item, position]
            dot = 0.0
            for dim in range(features.shape[1]):
                dot += np.float64(features[item, dim]) * np.float64(features[other, dim])
            weight = (dot / (norms[item] * norms[other])) ** alpha
            for dim in range(features.shape[1]):
                total[dim] += weight * np.float64(features[other, dim])
        for dim in range(features.shape[1]):
            out[item, dim] = total[dim] / num_neighbours
