"""Query × gallery distances of the re-ID protocol (docs/theory.md §5), block by block.

Shared by the protocol (:mod:`evaluation.reid.protocol`) and re-ranking
(:mod:`evaluation.reid.rerank`), so neither imports the other's module for them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..defaults import DEFAULT_REID_METRIC, METRICS
from ..knn import l2_normalize
from ..validation import (
    ArrayLike,
    DeviceLike,
    check_feature_pair,
    check_features,
    distance_rescaling_exponent,
)

# Size of one block of the query x gallery distance matrix when evaluating from features.
DEFAULT_BLOCK_BYTES = 256 * 2**20


def pairwise_distances(
    query_features: ArrayLike,
    gallery_features: ArrayLike,
    metric: str = DEFAULT_REID_METRIC,
    device: DeviceLike = None,
) -> np.ndarray:
    """The full (num_query, num_gallery) distance matrix of :func:`evaluate_reid`, as numpy.

    For small problems, plots and tests; the evaluator itself never holds this matrix whole.

    Raises:
        ValueError: for ``"euclidean"``, features whose squared distances overflow or underflow
            their precision (:func:`evaluate_reid` ranks them after an exact rescaling; here
            the distances themselves are asked for): pass them in float64 or rescale them.
    """
    query, gallery = check_feature_pair(
        check_features(query_features, "query_features"),
        check_features(gallery_features, "gallery_features"),
        "query_features",
        "gallery_features",
    )
    if metric == "euclidean" and distance_rescaling_exponent((query, gallery)):
        raise ValueError(
            f"squared distances of these {query.dtype} features overflow or underflow "
            f"{query.dtype}: pass float64 features or rescale them"
        )
    return DistanceBlocks.from_features(query, gallery, metric, device).dense()


@dataclass(frozen=True)
class DistanceBlocks:
    """Query x gallery distances, block by block, as offsets plus a scaled product.

    The distance of query ``i`` to gallery item ``j`` is
    ``(query_offsets[i] + gallery_offsets[j]) + scale * products[i, j]``, with ``blocks``
    yielding ``(first_query_row, products, query_offsets)``. The counting pass adds the offsets
    as it reads the products, which saves a pass over each block.
    """

    gallery_offsets: np.ndarray
    scale: np.floating
    blocks: Iterable[tuple[int, np.ndarray, np.ndarray]]

    @classmethod
    def from_distances(cls, distances: np.ndarray) -> DistanceBlocks:
        zero_offsets = np.zeros(len(distances), dtype=distances.dtype)
        return cls(
            np.zeros(distances.shape[1], dtype=distances.dtype),
            distances.dtype.type(1),
            [(0, distances, zero_offsets)],
        )

    @classmethod
    def from_features(
        cls,
        query: np.ndarray,
        gallery: np.ndarray,
        metric: str,
        device: DeviceLike = None,
        block_rows: int | None = None,
    ) -> DistanceBlocks:
        """ "euclidean": squared norms and ``-2`` times the inner product (torchreid's formula);
        "cosine": ``1 -`` the inner product of L2-normalised features. Products by torch on
        ``device`` (default CUDA when available, else CPU)."""
        import torch

        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        query, gallery = check_feature_pair(query, gallery, "query_features", "gallery_features")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if metric == "cosine":
            query, gallery = l2_normalize(query), l2_normalize(gallery)
        else:
            exponent = distance_rescaling_exponent((query, gallery))
            if exponent:
                query, gallery = np.ldexp(query, -exponent), np.ldexp(gallery, -exponent)
        gallery_t = torch.from_numpy(np.ascontiguousarray(gallery)).to(device)
        dtype = gallery.dtype.type
        if metric == "euclidean":
            gallery_offsets = (gallery_t * gallery_t).sum(1).cpu().numpy()
        else:
            gallery_offsets = np.zeros(len(gallery), dtype=dtype)
        block_rows = len(query) if block_rows is None else block_rows

        def blocks():
            for first in range(0, len(query), block_rows):
                block = np.ascontiguousarray(query[first : first + block_rows])
                block_t = torch.from_numpy(block).to(device)
                if metric == "euclidean":
                    offsets = (block_t * block_t).sum(1).cpu().numpy()
                else:
                    offsets = np.ones(len(block), dtype=dtype)
                yield first, (block_t @ gallery_t.T).cpu().numpy(), offsets

        return cls(gallery_offsets, dtype(-2 if metric == "euclidean" else -1), blocks())

    def row(self, products_row: np.ndarray, query_offset: int) -> np.ndarray:
        """One query's distances, by the formula the counting pass uses."""
        return (query_offset + self.gallery_offsets) + self.scale * products_row

    def dense(self) -> np.ndarray:
        """The whole distance matrix (consumes ``blocks``)."""
        return np.concatenate(
            [
                (offsets[:, None] + self.gallery_offsets) + self.scale * products
                for _, products, offsets in self.blocks
            ]
        )
