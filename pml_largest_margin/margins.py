"""Class and sample margins and their upper bounds (SPEC section 2).

Prototypes are taken in PML's layout: ``W`` of shape (embedding_size, num_classes), one column per
class, as stored by ``ArcFaceLoss.W`` and this package's losses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._validation import check_embeddings, check_labels, check_prototypes

# Elements of one block of the cosine matrix; 2**24 float32 values are 64 MB.
_BLOCK_ELEMENTS = 2**24


@dataclass(frozen=True)
class ClassMargin:
    """The smallest angle between two prototypes and the pair (j, k), j < k, that attains it."""

    radians: float
    closest_pair: tuple[int, int]

    @property
    def degrees(self) -> float:
        return math.degrees(self.radians)


def _inverse_column_norms(weights: torch.Tensor) -> torch.Tensor:
    norms = torch.linalg.vector_norm(weights, dim=0)
    if bool((norms == 0).any()):
        raise ValueError("W has a zero prototype column; its direction is undefined")
    return norms.reciprocal()


def class_margin(W: torch.Tensor, block_size: int | None = None) -> ClassMargin:
    """Class margin ``min_{j != k} arccos(ŵ_j · ŵ_k)`` of the prototypes ``W`` (d, C).

    Computed block by block over the upper triangle of the cosine matrix, so memory stays at one
    block of ``block_size × C`` cosines (about 64 MB by default) whatever C is; no normalised copy
    of W is made.
    """
    check_prototypes(W)
    num_classes = W.shape[1]
    if num_classes < 2:
        raise ValueError(f"the class margin needs at least 2 classes, got {num_classes}")
    weights = W.detach()
    if block_size is None:
        block_size = max(1, _BLOCK_ELEMENTS // num_classes)
    inverse_norms = _inverse_column_norms(weights)
    best_cosine, best_pair = -math.inf, (0, 1)
    for start in range(0, num_classes - 1, block_size):
        stop = min(start + block_size, num_classes - 1)
        # Row r of this block is class start + r; only columns after it are compared.
        cosines = weights[:, start:stop].t() @ weights[:, start + 1 :]
        cosines *= inverse_norms[start:stop, None]
        cosines *= inverse_norms[None, start + 1 :]
        rows = torch.arange(stop - start, device=weights.device)
        columns = torch.arange(num_classes - start - 1, device=weights.device)
        cosines.masked_fill_(columns[None, :] < rows[:, None], -math.inf)
        flat_index = int(torch.argmax(cosines))
        value = float(cosines.view(-1)[flat_index])
        if value > best_cosine:
            row, column = divmod(flat_index, cosines.shape[1])
            best_cosine, best_pair = value, (start + row, start + 1 + column)
    return ClassMargin(math.acos(min(1.0, max(-1.0, best_cosine))), best_pair)


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
    """
    unit_embeddings = torch.nn.functional.normalize(embeddings, dim=1)
    return (unit_embeddings @ W) / torch.linalg.vector_norm(W, dim=0)


def sample_margins_from_cosines(cosines: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``γ_i = cos_{i,y_i} − max_{j≠y_i} cos_ij`` from an (N, C) cosine matrix already computed.

    The losses call this on the cosines they hold, so margins have one definition package-wide.
    """
    column = labels.long()[:, None]
    target = cosines.gather(1, column).squeeze(1)
    return target - cosines.scatter(1, column, -math.inf).amax(dim=1)


def sample_margins(
    embeddings: torch.Tensor, labels: torch.Tensor, W: torch.Tensor, block_size: int | None = None
) -> torch.Tensor:
    """Per-sample margins ``γ_i = cos_{i,y_i} − max_{j≠y_i} cos_ij`` in [-2, 2], shape (N,).

    Differentiable; rows are processed in blocks of ``block_size`` so that measuring a whole data
    set never holds more than one block of the N × C cosine matrix.
    """
    check_embeddings(embeddings)
    check_prototypes(W, embedding_size=embeddings.shape[1])
    num_classes = W.shape[1]
    if num_classes < 2:
        raise ValueError(f"sample margins need at least 2 classes, got {num_classes}")
    check_labels(labels, num_classes, embeddings.shape[0])
    if block_size is None:
        block_size = max(1, _BLOCK_ELEMENTS // num_classes)
    labels = labels.long()
    margins = []
    for start in range(0, embeddings.shape[0], block_size):
        cosines = cosine_logits(embeddings[start : start + block_size], W)
        margins.append(sample_margins_from_cosines(cosines, labels[start : start + block_size]))
    if not margins:
        return embeddings.new_zeros(0)
    return torch.cat(margins)


def sample_margin_upper_bound(num_classes: int) -> float:
    """``C/(C-1)``: no prototypes let every class's worst sample margin exceed it (SPEC section 2)."""
    if num_classes < 2:
        raise ValueError(f"need num_classes >= 2, got {num_classes}")
    return num_classes / (num_classes - 1)
