"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), sparse, at full scale (docs/theory.md §8).

The algorithm is that of the authors' released Python code, on the ``N = Q + G`` items of the
query and gallery sets together. With ``b`` the evaluator's distance (``"euclidean"``: squared
euclidean ``‖x − y‖²``; ``"cosine"``: ``1 − cos``) and ``p`` the convention's power:

- ``D_ij = b_ij^p / max_k b_ik^p`` (each column of ``b^p`` divided by its maximum, transposed);
- ``R(i, k)``: the items among the ``k + 1`` nearest of ``i`` that have ``i`` among their own
  ``k + 1`` nearest (neighbour order from exact search, the item itself first);
- ``R*(i)``: ``R(i, k1)`` plus each ``R(c, round(k1/2))`` (``c`` in ``R(i, k1)``) that shares
  more than 2/3 of its members with ``R(i, k1)``;
- ``V_ij = exp(−D_ij) / Σ_{j' ∈ R*(i)} exp(−D_ij')`` on ``R*(i)``, 0 elsewhere; then (when
  ``k2 > 1``) ``V_i ← mean of V_j`` over the ``k2`` nearest ``j`` of ``i``, itself included;
- ``J_ij = 1 − s_ij / (2 − s_ij)`` with ``s_ij = Σ_k min(V_ik, V_jk)``;
- the re-ranked distance of query ``i`` and gallery item ``j`` is ``(1 − λ) J_ij + λ D_ij``.

Conventions: ``"paper"`` (``p = 1``) feeds the squared euclidean distance, as the authors' code
does from features; ``"torchreid"`` (``p = 2``) squares the evaluator's distance once more, as
torchreid does when it hands its (already squared) distance matrix to the same function, so
``D`` is a fourth power of the euclidean distance. For ``metric="cosine"`` ``b = 1 − cos``,
which is half the squared euclidean distance of the L2-normalised features; the factor cancels
in ``D``, so ``"paper"`` ranks exactly the paper's distance on normalised features.

What is kept: the neighbour lists (N, max(k1 + 1, k2)), the sets and ``V`` as sparse rows
(about ``N · k2 · |R*|`` entries), and one block of query rows against the gallery at a time.
A pair outside each other's neighbourhoods has ``s = 0``, hence ``J = 1`` and the distance
``(1 − λ) + λ D_ij``, which is what the block holds before the sparse overlaps are added: no
(N, N) or (Q, G) matrix is ever formed. One blocked pass over all (N, N) products (torch, on
``device``) keeps per item a few more nearest candidates than needed and a few farthest ones;
their distances, the row maxima of ``b`` and the distances inside the sets are then recomputed
exactly (float64) from the features, and the exact distance orders the neighbours (equal
distances in index order, as a stable ``argsort`` of the row gives), so the k-NN lists are
exact. Float32 rounding in the pass can only matter when more than 8 items tie, within float32
rounding, with the last needed neighbour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..defaults import CONVENTIONS, DEFAULT_REID_METRIC
from ..knn import search_device
from ..validation import (
    ArrayLike,
    DeviceLike,
    check_features,
    check_positive_integer,
    check_same_dimension,
    distance_rescaling_exponent,
)
from ._rerank_kernel import (
    exact_nearest,
    expanded_sets,
    gaussian_weights,
    jaccard_block,
    reciprocal_sets,
    row_maxima,
)
from .distances import DEFAULT_BLOCK_BYTES, METRICS, DistanceBlocks

# Farthest candidates per item whose exact distance decides the row maximum (float32 near-ties).
_FARTHEST_CANDIDATES = 4
# Nearest candidates beyond those needed, kept so that float32 near-ties at the last needed
# neighbour are ordered by the exact distance.
_NEAREST_MARGIN = 8


@dataclass(frozen=True)
class KReciprocalOptions:
    """Parameters of k-reciprocal re-ranking; the defaults are the paper's.

    ``k1``: size of the k-reciprocal neighbourhoods; ``k2``: neighbours of the local query
    expansion (1 disables it); ``lambda_value``: weight of the original distance in the final
    one, in [0, 1]; ``convention``: ``"paper"`` or ``"torchreid"`` (see the module docstring).

    Raises:
        ValueError: a parameter out of range.
    """

    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    convention: str = "paper"

    def __post_init__(self):
        check_positive_integer(self.k1, "k1")
        check_positive_integer(self.k2, "k2")
        if isinstance(self.lambda_value, bool) or not 0 <= self.lambda_value <= 1:
            raise ValueError(f"lambda_value must lie in [0, 1], got {self.lambda_value!r}")
        if self.convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {self.convention!r}")

    @property
    def power(self) -> int:
        """The power of the evaluator's distance that is normalised into ``D``."""
        return 2 if self.convention == "torchreid" else 1


#: What ``rerank=`` accepts (see :func:`as_rerank_options`).
RerankArgument = bool | KReciprocalOptions | dict | None


def as_rerank_options(rerank: RerankArgument) -> KReciprocalOptions | None:
    """``rerank=`` of the evaluators: ``None``/``False`` (off), ``True`` (the paper's
    parameters), a :class:`KReciprocalOptions`, or a dict of its fields."""
    if rerank is None or rerank is False:
        return None
    if rerank is True:
        return KReciprocalOptions()
    if isinstance(rerank, KReciprocalOptions):
        return rerank
    if isinstance(rerank, dict):
        return KReciprocalOptions(**rerank)
    raise TypeError(
        f"rerank must be a bool, a KReciprocalOptions or a dict, got {type(rerank).__name__}"
    )


def k_reciprocal_rerank(
    query_features: ArrayLike,
    gallery_features: ArrayLike,
    metric: str = DEFAULT_REID_METRIC,
    options: KReciprocalOptions | None = None,
    *,
    device: DeviceLike = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    use_gpu: bool | None = None,
) -> DistanceBlocks:
    """The re-ranked query x gallery distances of docs/theory.md §8, block by block.

    Returns :class:`~evaluation.reid.distances.DistanceBlocks` whose blocks are float64 rows of
    the final distance ``(1 − λ) J + λ D`` (zero offsets, scale 1): hand it to the evaluator,
    or call ``.dense()`` on a small problem. ``options`` defaults to the paper's parameters.
    Products run with torch on ``device`` (default CUDA when available; the deprecated
    ``use_gpu=`` picks ``"cuda"`` or ``"cpu"`` when ``device`` is not given). A block (the
    products of its query rows and their float64 final distances) holds at most about
    ``block_bytes``.

    Raises:
        ValueError: bad features, ``metric``, parameters, ``k1 + 1`` or ``k2`` above the
            number of items, or every item at distance 0 from every other.
    """
    options = KReciprocalOptions() if options is None else options
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if block_bytes <= 0:
        raise ValueError(f"block_bytes must be positive, got {block_bytes}")
    query = check_features(query_features, "query_features")
    gallery = check_features(gallery_features, "gallery_features")
    check_same_dimension(query, gallery, "query_features", "gallery_features")
    # Re-ranking does not change when every feature is scaled by one factor, so a power-of-two
    # rescaling (exact) keeps the float32 products of huge or tiny features finite. It is taken
    # here, once, so that every distance below (neighbours, scales, weights, D) is in one unit.
    exponent = distance_rescaling_exponent((query, gallery))
    if exponent:
        query, gallery = np.ldexp(query, -exponent), np.ldexp(gallery, -exponent)
    num_query, num_gallery = len(query), len(gallery)
    joint = np.concatenate([query, gallery])
    num_items = len(joint)
    num_neighbours = max(options.k1 + 1, options.k2)
    if num_neighbours > num_items:
        raise ValueError(
            f"re-ranking needs max(k1 + 1, k2) = {num_neighbours} neighbours but there are only "
            f"{num_items} query and gallery items"
        )
    cosine = metric == "cosine"
    norms = np.sqrt(np.einsum("ij,ij->i", joint, joint, dtype=np.float64))
    if cosine and (norms == 0).any():
        raise ValueError("cannot L2-normalise a zero feature vector")

    if use_gpu is not None:
        # The deprecated keyword picked the search's device; the search is now this one pass.
        deprecated_device = search_device(None, use_gpu)
        device = deprecated_device if device is None else device
    neighbours, largest = _neighbours_and_largest_distances(
        joint, norms, num_neighbours, metric, device, block_bytes
    )
    power = options.power
    scales = largest**power
    if not (scales > 0).all():
        raise ValueError("an item is at distance 0 from every other: D cannot be normalised")

    weights = _expanded_weights(joint, norms, neighbours, scales, options, cosine)
    del joint  # the blocks below read the query and gallery features only
    query_rows = weights[:num_query]
    gallery_columns = weights[num_query:].tocsc()
    # Per gallery item, a block holds the products and the float64 final distance; the next
    # block is built while the consumer still holds the last one, hence the factor 2.
    block_rows = max(1, block_bytes // (2 * num_gallery * (query.itemsize + 8)))
    originals = DistanceBlocks.from_features(query, gallery, metric, device, block_rows)

    def blocks():
        for first, products, query_offsets in originals.blocks:
            final = np.zeros(products.shape)
            jaccard_block(
                first,
                query_rows.indptr,
                query_rows.indices,
                query_rows.data,
                gallery_columns.indptr,
                gallery_columns.indices,
                gallery_columns.data,
                products,
                query_offsets,
                originals.gallery_offsets,
                originals.scale,
                final,
                scales,
                power,
                float(options.lambda_value),
            )
            yield first, final, np.zeros(len(final))

    return DistanceBlocks(np.zeros(num_gallery), np.float64(1), blocks())


def _neighbours_and_largest_distances(joint, norms, num_neighbours, metric, device, block_bytes):
    """Per item, its ``num_neighbours`` nearest items (itself included, nearest first, ties in
    index order) and its largest distance ``max_j b(i, j)``, by the exact float64 distance.

    One blocked torch pass over all (N, N) products keeps, per row, the
    ``num_neighbours + _NEAREST_MARGIN`` nearest and the ``_FARTHEST_CANDIDATES`` farthest
    columns by float32 keys; their distances are then recomputed exactly, which decides the
    order (float32 rounding can only swap near-ties, and these stay within the margin).
    """
    import torch

    cosine = metric == "cosine"
    num_items = len(joint)
    num_near = min(num_items, num_neighbours + _NEAREST_MARGIN)
    num_far = min(num_items, _FARTHEST_CANDIDATES)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    features_t = torch.from_numpy(np.ascontiguousarray(joint)).to(device)
    # Per row, one constant (the row's own squared norm or norm) does not change the order, so
    # the keys drop it: ‖x_j‖² − 2 x_i·x_j (euclidean), −x_i·x_j / ‖x_j‖ (cosine).
    column_norms = torch.linalg.vector_norm(features_t, dim=1)
    column_terms = 1 / column_norms if cosine else column_norms * column_norms
    # An eighth of the budget for a block's keys: torch's top-k selections over them take
    # temporaries of about their size, and the pass runs while the joint features are held.
    block_rows = max(1, block_bytes // (8 * num_items * joint.itemsize))
    near = np.empty((num_items, num_near), dtype=np.int64)
    far = np.empty((num_items, num_far), dtype=np.int64)
    for first in range(0, num_items, block_rows):
        keys = features_t[first : first + block_rows] @ features_t.T
        if cosine:
            keys *= -column_terms
        else:
            keys *= -2
            keys += column_terms
        rows = slice(first, first + len(keys))
        near[rows] = torch.topk(keys, num_near, dim=1, largest=False, sorted=False).indices.cpu()
        far[rows] = torch.topk(keys, num_far, dim=1, sorted=False).indices.cpu()
    neighbours = exact_nearest(joint, norms, near, num_neighbours, cosine)
    return neighbours, row_maxima(joint, norms, far, cosine)


def _expanded_weights(joint, norms, neighbours, scales, options, cosine):
    """The sparse ``V`` (N, N) after local query expansion, as CSR."""
    from scipy.sparse import csr_matrix

    num_items = len(joint)
    reciprocal = reciprocal_sets(neighbours, options.k1)
    half = reciprocal_sets(neighbours, round(options.k1 / 2))
    indptr, indices = expanded_sets(*reciprocal, *half)
    data = gaussian_weights(joint, norms, indptr, indices, scales, options.power, cosine)
    weights = csr_matrix((data, indices, indptr), shape=(num_items, num_items))
    if options.k2 == 1:
        return weights
    k2 = options.k2
    nearest = csr_matrix(
        (
            np.ones(num_items * k2),
            neighbours[:, :k2].ravel(),
            np.arange(0, num_items * k2 + 1, k2),
        ),
        shape=(num_items, num_items),
    )
    expanded = nearest @ weights
    expanded.data /= k2
    return expanded
