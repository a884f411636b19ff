"""``(u, t, γ)`` of the margin-softmax losses when each class has k sub-centres (docs/theory.md §7.8).

A class's cosine is the largest of its k sub-centres' cosines, ``cos_ij = max_l cos(z_i, w_{j,l})``,
and then ``u_i = log Σ_{j≠y_i} exp(s·cos_ij)``, ``t_i = cos_{i,y_i}`` and
``γ_i = t_i − max_{j≠y_i} cos_ij`` as in :mod:`pml_largest_margin.losses.fused`. The maximum over
sub-centres sits between the matrix product and the log-sum-exp, so the fused kernel (which
exponentiates the product directly) does not apply; these go through autograd:

- ``"buffer"``: the (N, C·k) sub-centre cosines at once, as PML's ``SubCenterArcFaceLoss`` does;
- ``"stream"``: the classes in blocks, each block's ``(log-sum-exp, target, maximum)`` under
  activation checkpointing, so only (N,) vectors per block are kept and each block's cosines are
  recomputed in backward. Blocks are combined exactly (a log-sum-exp of the blocks' log-sum-exps).

The maximum's gradient goes to the best sub-centre, shared evenly among tied ones (``amax``'s rule,
as for the sample margins; PML's ``max`` picks one of them).
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from ..margins import cosine_logits, max_over_sub_centers, sample_margins_from_cosines
from .functional import nontarget_logsumexp, target_cosines
from .fused import stream_block_columns, uses_stream


def _block_statistics(
    embeddings: torch.Tensor,
    weights: torch.Tensor,
    block_labels: torch.Tensor,
    scale: float,
    sub_centers: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log Σ_{j≠y} exp(s·cos_ij), t_i or 0, max_{j≠y} cos_ij)`` over one block of classes.

    ``block_labels`` (N,): each row's target class within the block, or −1 for none. A block
    holds at least 2 classes, so every row has a non-target class in it.
    """
    cosines = max_over_sub_centers(cosine_logits(embeddings, weights), sub_centers)
    in_block = block_labels >= 0
    columns = block_labels.clamp_min(0)[:, None]
    target = torch.where(in_block, cosines.gather(1, columns).squeeze(1), 0.0)
    is_target = torch.zeros_like(cosines, dtype=torch.bool).scatter_(1, columns, in_block[:, None])
    others = cosines.masked_fill(is_target, -math.inf)
    return torch.logsumexp(scale * others, dim=1), target, others.amax(dim=1)


def _class_blocks(num_classes: int, classes_per_block: int) -> list[tuple[int, int]]:
    """Near-equal ``(start, stop)`` ranges of at least 2 classes covering ``range(num_classes)``."""
    count = max(1, min(math.ceil(num_classes / max(2, classes_per_block)), num_classes // 2))
    bounds = [round(index * num_classes / count) for index in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def sub_center_statistics(
    embeddings: torch.Tensor,
    weights: torch.Tensor,
    labels: torch.Tensor,
    scale: float,
    sub_centers: int,
    *,
    with_margins: bool = False,
    memory: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(u, t, γ or None)`` for embeddings (N, d), sub-centres ``weights`` (d, C·k), labels (N,).

    Differentiable with respect to ``embeddings`` and ``weights``. ``memory`` as for
    :func:`~pml_largest_margin.losses.fused.fused_nontarget_logsumexp` (``"auto"`` streams when
    the (N, C·k) cosines would exceed ``BUFFER_LIMIT_BYTES``); both give the same values and
    gradients up to rounding.
    """
    labels = labels.long()
    if not uses_stream(memory, embeddings.shape[0], weights.shape[1], weights.dtype):
        cosines = max_over_sub_centers(cosine_logits(embeddings, weights), sub_centers)
        margins = sample_margins_from_cosines(cosines, labels) if with_margins else None
        return nontarget_logsumexp(cosines, labels, scale), target_cosines(cosines, labels), margins
    num_classes = weights.shape[1] // sub_centers
    block_columns = stream_block_columns(embeddings.shape[0], embeddings.device, weights.dtype)
    classes_per_block = block_columns // sub_centers
    blocks = _class_blocks(num_classes, classes_per_block)
    # One split, not a slice per block: a slice's backward writes a zero-filled copy of all of W's
    # gradient for each block, the split's backward concatenates the blocks' gradients once.
    block_weights_list = torch.split(
        weights, [(stop - start) * sub_centers for start, stop in blocks], dim=1
    )
    parts = []
    for (start, stop), block_weights in zip(blocks, block_weights_list, strict=True):
        in_block = (labels >= start) & (labels < stop)
        block_labels = torch.where(in_block, labels - start, -1)
        parts.append(
            checkpoint(
                _block_statistics,
                embeddings,
                block_weights,
                block_labels,
                scale,
                sub_centers,
                use_reentrant=False,
            )
        )
    lse, target, maxima = (torch.stack(values) for values in zip(*parts, strict=True))
    margins = target.sum(dim=0) - maxima.amax(dim=0) if with_margins else None
    return torch.logsumexp(lse, dim=0), target.sum(dim=0), margins
