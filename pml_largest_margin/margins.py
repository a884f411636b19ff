"""Class and sample margins and their upper bounds (docs/theory.md §2).

Prototypes are taken in PML's layout: ``W`` of shape (embedding_size, num_classes), one column per
class, as stored by ``ArcFaceLoss.W`` and this package's losses.

Zero vectors follow one rule package-wide, the fused loss kernel's: a norm is clamped to at least
``NORM_EPS`` (1e-12) before dividing, as ``torch.nn.functional.normalize`` does, so a zero
embedding or a zero prototype column has cosine 0 with everything (a prototype at 90° to all
others, a sample margin of 0 for a zero embedding). :func:`cosine_logits`, :func:`sample_margins`,
:func:`class_margin` and the losses (their values, ``get_logits`` and their stats) agree on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .validation import (
    NORM_EPS,
    check_embeddings,
    check_integer,
    check_labels,
    check_prototypes,
)

# Elements of one block of the N × C cosine matrix; 2**24 float32 values are 64 MB.
_BLOCK_ELEMENTS = 2**24
# Side of a square tile of the C × C cosine matrix: 4 MB of float32, which stays in cache
# (1024 was fastest here, 5× faster than row blocks of the full width at C = 20k).
_TILE_SIZE = 1024


@dataclass(frozen=True)
class ClassMargin:
    """The smallest angle between two prototypes and the pair (j, k), j < k, that attains it."""

    radians: float
    closest_pair: tuple[int, int]

    @property
    def degrees(self) -> float:
        return math.degrees(self.radians)


def _inverse_column_norms(weights: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``1/max(‖w_j‖, NORM_EPS)`` per column (a zero column gets cosine 0 with everything)."""
    return torch.linalg.vector_norm(weights, dim=0, dtype=dtype).clamp_min(NORM_EPS).reciprocal()


def _angle(u: torch.Tensor, v: torch.Tensor) -> float:
    """Angle between two vectors as ``2·atan2(‖û − v̂‖, ‖û + v̂‖)`` in float64, accurate near 0 and π.

    A vector of norm below ``NORM_EPS`` has cosine 0 with every vector, so its angle is π/2.
    """
    u, v = u.double(), v.double()
    if min(float(torch.linalg.vector_norm(u)), float(torch.linalg.vector_norm(v))) < NORM_EPS:
        return math.pi / 2
    u = torch.nn.functional.normalize(u, dim=0)
    v = torch.nn.functional.normalize(v, dim=0)
    return 2.0 * math.atan2(
        float(torch.linalg.vector_norm(u - v)), float(torch.linalg.vector_norm(u + v))
    )


def _closest_pair_in_row_blocks(
    weights: torch.Tensor,
    inverse_norms: torch.Tensor,
    block_size: int,
    row_starts: range,
    sub_centers: int = 1,
) -> tuple[float, tuple[int, int]]:
    """Largest cosine over pairs j < k with j in the row blocks starting at ``row_starts``.

    Visits the tiles of those row blocks on and right of the diagonal. Separate from
    :func:`class_margin` so the benchmark can time a measured share of the tiles at C = 1M.
    With ``sub_centers=k`` the columns are sub-centres and pairs of the same class (same
    ``column // k``) are skipped.
    """
    num_classes = weights.shape[1]
    # No larger than the matrix: a 1024 × 1024 mask would cost more than the tiles of small C.
    side = min(block_size, num_classes)
    below_diagonal = torch.ones(side, side, dtype=torch.bool, device=weights.device).tril_()
    best_cosine, best_pair = -math.inf, (0, 1)
    for row_start in row_starts:
        row_stop = min(row_start + block_size, num_classes)
        rows = (weights[:, row_start:row_stop] * inverse_norms[row_start:row_stop]).t()
        for column_start in range(row_start, num_classes, block_size):
            column_stop = min(column_start + block_size, num_classes)
            cosines = rows @ (
                weights[:, column_start:column_stop] * inverse_norms[column_start:column_stop]
            )
            if column_start == row_start:  # diagonal tile: keep pairs j < k only
                cosines.masked_fill_(below_diagonal[: cosines.shape[0], : cosines.shape[1]], -2.0)
            if sub_centers > 1 and column_start < row_stop + sub_centers:
                # Only tiles near the diagonal can hold two sub-centres of one class.
                row_classes = torch.arange(row_start, row_stop, device=weights.device)
                column_classes = torch.arange(column_start, column_stop, device=weights.device)
                same_class = (row_classes // sub_centers)[:, None] == (
                    column_classes // sub_centers
                )[None, :]
                cosines.masked_fill_(same_class, -2.0)
            tile_best = float(cosines.max())
            if tile_best > best_cosine:
                row, column = divmod(int(torch.argmax(cosines)), cosines.shape[1])
                best_cosine, best_pair = tile_best, (row_start + row, column_start + column)
    return best_cosine, best_pair


def class_margin(
    W: torch.Tensor, block_size: int | None = None, *, sub_centers: int = 1
) -> ClassMargin:
    """Class margin ``min_{j != k} arccos(ŵ_j · ŵ_k)`` of the prototypes ``W`` (d, C).

    With ``sub_centers=k``, ``W`` is (d, C·k) in PML's class-major layout and the margin is the
    smallest angle between two sub-centres of different classes (those of one class may be as
    close as they like); ``closest_pair`` then names the two classes.

    The upper triangle of the cosine matrix is visited in ``block_size × block_size`` tiles
    (1024 by default, 4 MB of float32), so memory stays at a few tiles plus the C column norms
    whatever C is, and no normalised copy of W is made: each tile normalises its own columns.
    Time is O(C²d). float16/bfloat16 prototypes are compared in float32 (their squared norms can
    overflow float16); the angle of the closest pair is recomputed in float64 from a formula that
    stays accurate for nearly (anti)parallel pairs. A zero column is at π/2 from every other
    (module docstring).
    """
    check_prototypes(W)
    sub_centers = check_integer(sub_centers, "sub_centers", at_least=1)
    if W.shape[1] % sub_centers:
        raise ValueError(f"W has {W.shape[1]} columns, not a multiple of sub_centers={sub_centers}")
    num_classes = W.shape[1] // sub_centers
    if num_classes < 2:
        raise ValueError(f"the class margin needs at least 2 classes, got {num_classes}")
    block_size = (
        _TILE_SIZE if block_size is None else check_integer(block_size, "block_size", at_least=1)
    )
    weights = W.detach()
    # Half-precision tiles are promoted to float32 by the float32 norms, tile by tile.
    half = weights.dtype in (torch.float16, torch.bfloat16)
    inverse_norms = _inverse_column_norms(weights, torch.float32 if half else None)
    row_blocks = range(0, W.shape[1], block_size)
    _, best_pair = _closest_pair_in_row_blocks(
        weights, inverse_norms, block_size, row_blocks, sub_centers
    )
    angle = _angle(weights[:, best_pair[0]], weights[:, best_pair[1]])
    return ClassMargin(angle, (best_pair[0] // sub_centers, best_pair[1] // sub_centers))


def class_margin_upper_bound(num_classes: int, embedding_size: int) -> float:
    """Upper bound (radians) on the class margin of ``num_classes`` prototypes in R^embedding_size.

    ``arccos(-1/(C-1))``, attained by a regular simplex when ``C <= d + 1``. For ``C > d + 1``
    Rankin's bound applies as well: no more than d + 1 directions can be pairwise obtuse, so the
    margin is at most π/2 (attained by the cross-polytope up to C = 2d); the smaller bound is returned.
    """
    if num_classes < 2 or embedding_size < 1:
        raise ValueError(
            f"need num_classes >= 2 and embedding_size >= 1, got {num_classes} and {embedding_size}"
        )
    simplex_bound = math.acos(-1.0 / (num_classes - 1))
    if num_classes > embedding_size + 1:
        return min(simplex_bound, math.pi / 2)
    return simplex_bound


def cosine_logits(embeddings: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``cos_ij = ŵ_j · ẑ_i`` for embeddings (N, d) and prototypes W (d, C), shape (N, C).

    The columns of W are scaled after the product, so no normalised copy of W is materialised.
    Norms are clamped to at least ``NORM_EPS``: a zero row or column gives cosines 0. Mixed
    dtypes are computed in the promoted one (float64 embeddings with float32 W in float64).
    """
    dtype = torch.promote_types(embeddings.dtype, W.dtype)
    embeddings, W = embeddings.to(dtype), W.to(dtype)
    unit_embeddings = torch.nn.functional.normalize(embeddings, dim=1, eps=NORM_EPS)
    return (unit_embeddings @ W) / torch.linalg.vector_norm(W, dim=0).clamp_min(NORM_EPS)


def sample_margins_from_cosines(cosines: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``γ_i = cos_{i,y_i} − max_{j≠y_i} cos_ij`` from an (N, C) cosine matrix already computed.

    The losses call this on the cosines they hold, so margins have one definition package-wide.
    """
    column = labels.long()[:, None]
    target = cosines.gather(1, column).squeeze(1)
    return target - cosines.scatter(1, column, -math.inf).amax(dim=1)


def max_over_sub_centers(cosines: torch.Tensor, sub_centers: int) -> torch.Tensor:
    """Class cosines (N, C) from sub-centre cosines (N, C·k): each class keeps its best sub-centre.

    Columns are class-major as in PML's ``SubCenterArcFaceLoss``: class c owns columns
    ``c·k … c·k + k − 1``.
    """
    if sub_centers == 1:
        return cosines
    return cosines.view(cosines.shape[0], cosines.shape[1] // sub_centers, sub_centers).amax(dim=2)


def sample_margins(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    W: torch.Tensor,
    block_size: int | None = None,
    *,
    sub_centers: int = 1,
) -> torch.Tensor:
    """Per-sample margins ``γ_i = cos_{i,y_i} − max_{j≠y_i} cos_ij`` in [-2, 2], shape (N,).

    ``W`` is (d, C), or (d, C·k) with ``sub_centers=k`` (a class's cosine is then the largest
    over its k sub-centres). Differentiable; rows are processed in blocks of ``block_size`` so
    that measuring a whole data set never holds more than one block of the N × C cosine matrix.
    A zero embedding or prototype has cosine 0 with everything (module docstring); an empty batch
    gives an empty result.
    """
    check_embeddings(embeddings)
    check_prototypes(W, embedding_size=embeddings.shape[1])
    sub_centers = check_integer(sub_centers, "sub_centers", at_least=1)
    if W.shape[1] % sub_centers:
        raise ValueError(f"W has {W.shape[1]} columns, not a multiple of sub_centers={sub_centers}")
    num_classes = W.shape[1] // sub_centers
    if num_classes < 2:
        raise ValueError(f"sample margins need at least 2 classes, got {num_classes}")
    check_labels(labels, num_classes, embeddings.shape[0])
    if block_size is None:
        block_size = max(1, _BLOCK_ELEMENTS // W.shape[1])
    block_size = check_integer(block_size, "block_size", at_least=1)
    labels = labels.long()
    margins = []
    # An empty batch still runs one (empty) block, so the result is on the graph of both inputs.
    for start in range(0, max(1, embeddings.shape[0]), block_size):
        cosines = cosine_logits(embeddings[start : start + block_size], W)
        cosines = max_over_sub_centers(cosines, sub_centers)
        margins.append(sample_margins_from_cosines(cosines, labels[start : start + block_size]))
    return torch.cat(margins)


def sample_margin_upper_bound(num_classes: int) -> float:
    """``C/(C-1)``: no prototypes let every class's worst sample margin exceed it (docs/theory.md §2)."""
    if num_classes < 2:
        raise ValueError(f"need num_classes >= 2, got {num_classes}")
    return num_classes / (num_classes - 1)
