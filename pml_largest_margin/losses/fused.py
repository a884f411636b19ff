"""Fused ``(u, t)`` of the margin-softmax losses from embeddings and prototypes, gradient written out.

With ``ẑ_i = z_i/‖z_i‖`` and ``cos_ij = (ẑ_i · w_j)/‖w_j‖`` the function returns

    u_i = log Σ_{j≠y_i} exp(s·cos_ij)        and        t_i = cos_{i,y_i}

(see :mod:`pml_largest_margin.losses.functional` for the heads that turn them into losses).
Autograd through the plain formula keeps several batch × classes tensors alive and a normalised
copy of W; here one (N, C) buffer does all the work:

forward   ``X = ẑ @ W``, scaled column-wise by ``1/‖w_j‖`` in place (the cosines), the target
          entries set to −inf, then ``exp(s·(X − max))`` in place; its row sums give ``u``. The
          buffer is finally scaled by ``1/‖w_j‖`` once more and kept for the backward pass.
backward  with ``a = ∂/∂u`` and ``b = ∂/∂t``, the gradient on the cosines is ``a_i·s·p_ij`` off
          the target (``p`` the softmax over non-target classes) and ``b_i`` on it. Row factors are
          moved onto the (N, d) operands, so the saved buffer is only read: ``∂/∂ẑ = r∘(X W^T) +
          b∘ŵ_y`` and ``∂/∂ŵ_j/‖w_j‖ = ((r∘ẑ)^T X)_j`` plus the target columns, with ``r = a·s/Σ``.
          The normalisations contribute projections: ``∂/∂z = (g − ẑ(ẑ·g))/‖z‖`` and likewise per
          column of W, the column dot products taken in blocks.

Three matrix products in all, the minimum for this loss; peak memory is W, its gradient, one (N, C)
buffer and (N, d) or (C,) vectors.

Optionally the sample margins ``γ_i = t_i − max_{j≠y_i} cos_ij`` come out too, differentiable and
nearly free: the row maximum of the non-target cosines is taken anyway for a stable log-sum-exp.
Their gradient on the cosines is +1 at the target and −1 at the nearest non-target class, split
evenly among non-target classes tied for the maximum (torch.amax's rule, so it equals autograd
through :func:`pml_largest_margin.margins.sample_margins_from_cosines`). The forward pass records
the (row, class) pairs of those maxima, typically N of them, and backward adds two rank-N updates;
no further matrix product and no further (N, C) buffer. The saved buffer is never overwritten, so ``retain_graph`` and
``gradcheck`` work. Everything runs in the dtype of the inputs with autocast disabled.
"""

from __future__ import annotations

import math

import torch

# Norms below NORM_EPS are clamped, as torch.nn.functional.normalize does; it is defined with the
# checks so that margins.py (imported by this package) applies the same rule.
from ..validation import NORM_EPS

# Columns per block when taking column-wise dot products of two (d, C) matrices.
_COLUMN_BLOCK = 4096
# Elements per block when searching the (N, C) buffer for row maxima (a bool temporary of 4 MB).
_SEARCH_BLOCK = 2**22


def _row_maximum_positions(
    shifted: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows, columns and 1/(ties in the row) of the zeros of ``shifted`` = cosines − row maxima.

    ``x − m == 0`` exactly when ``x == m`` for finite floats, so the zeros are the maxima, ties
    included. Searched in row blocks to keep the boolean temporary small.
    """
    rows_per_block = max(1, _SEARCH_BLOCK // max(1, shifted.shape[1]))
    rows, columns = [], []
    for start in range(0, shifted.shape[0], rows_per_block):
        block_rows, block_columns = (shifted[start : start + rows_per_block] == 0).nonzero(
            as_tuple=True
        )
        rows.append(block_rows + start)
        columns.append(block_columns)
    rows, columns = torch.cat(rows), torch.cat(columns)
    ties = torch.bincount(rows, minlength=shifted.shape[0])
    return rows, columns, ties.to(shifted.dtype).reciprocal()[rows]


def column_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(0)`` for (d, C) matrices without a (d, C) temporary."""
    out = torch.empty(a.shape[1], dtype=a.dtype, device=a.device)
    for start in range(0, a.shape[1], _COLUMN_BLOCK):
        stop = start + _COLUMN_BLOCK
        torch.sum(a[:, start:stop] * b[:, start:stop], dim=0, out=out[start:stop])
    return out


def _normalisation_backward(
    grad_unit: torch.Tensor, unit: torch.Tensor, inverse_norms: torch.Tensor, clamped: torch.Tensor
) -> torch.Tensor:
    """Gradient through ``x/max(‖x‖, eps)`` for rows: a projection, plain scaling where clamped."""
    radial = (unit * grad_unit).sum(dim=1, keepdim=True)
    projected = grad_unit - unit * radial.masked_fill(clamped[:, None], 0.0)
    return projected * inverse_norms[:, None]


class _NonTargetLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, embeddings, weights, labels, scale, with_margins):
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            embedding_norms = torch.linalg.vector_norm(embeddings, dim=1)
            inverse_embedding_norms = embedding_norms.clamp_min(NORM_EPS).reciprocal()
            unit = embeddings * inverse_embedding_norms[:, None]
            weight_norms = torch.linalg.vector_norm(weights, dim=0)
            inverse_weight_norms = weight_norms.clamp_min(NORM_EPS).reciprocal()
            columns = labels.long()[:, None]

            buffer = unit @ weights
            buffer.mul_(inverse_weight_norms)
            target = buffer.gather(1, columns).squeeze(1)
            buffer.scatter_(1, columns, -math.inf)
            row_max = buffer.amax(dim=1)
            torch.sub(buffer, row_max[:, None], out=buffer)
            nearest = (columns.new_empty(0),) * 2 + (buffer.new_empty(0),)
            if with_margins:
                margins = target - row_max
                if any(ctx.needs_input_grad[:2]):
                    nearest = _row_maximum_positions(buffer)
            else:
                margins = buffer.new_empty(0)
            buffer.mul_(scale).exp_()
            row_sums = buffer.sum(dim=1)
            nontarget_lse = scale * row_max + row_sums.log()
            buffer.mul_(inverse_weight_norms)

        ctx.scale = scale
        ctx.save_for_backward(
            unit,
            inverse_embedding_norms,
            embedding_norms < NORM_EPS,
            weights,
            inverse_weight_norms,
            weight_norms < NORM_EPS,
            columns,
            buffer,
            row_sums,
            *nearest,
        )
        if not with_margins:
            ctx.mark_non_differentiable(margins)
        return nontarget_lse, target, margins

    @staticmethod
    def backward(ctx, grad_lse, grad_target, grad_margins):
        (
            unit,
            inverse_embedding_norms,
            embedding_clamped,
            weights,
            inverse_weight_norms,
            weight_clamped,
            columns,
            buffer,
            row_sums,
            nearest_rows,
            nearest_columns,
            nearest_shares,
        ) = ctx.saved_tensors
        need_embeddings, need_weights = ctx.needs_input_grad[:2]
        if grad_lse is None:
            grad_lse = torch.zeros_like(row_sums)
        if grad_target is None:
            grad_target = torch.zeros_like(row_sums)
        if grad_margins is not None and grad_margins.numel():
            # γ = t − max: +∂/∂γ joins the target's gradient, −∂/∂γ goes to the maxima.
            grad_target = grad_target + grad_margins
            grad_nearest = -grad_margins[nearest_rows] * nearest_shares
        else:
            grad_nearest = None
        labels = columns.squeeze(1)
        row_factor = grad_lse * ctx.scale / row_sums
        grad_embeddings = grad_weights = None

        with torch.autocast(device_type=unit.device.type, enabled=False):
            if need_embeddings:
                target_units = weights[:, labels].t() * inverse_weight_norms[labels, None]
                grad_unit = (buffer @ weights.t()).mul_(row_factor[:, None])
                grad_unit.addcmul_(target_units, grad_target[:, None])
                if grad_nearest is not None:
                    nearest_units = (
                        weights[:, nearest_columns].t()
                        * inverse_weight_norms[nearest_columns, None]
                    )
                    grad_unit.index_add_(0, nearest_rows, nearest_units * grad_nearest[:, None])
                grad_embeddings = _normalisation_backward(
                    grad_unit, unit, inverse_embedding_norms, embedding_clamped
                )
            if need_weights:
                # Column j holds ∂L/∂ŵ_j / ‖w_j‖; the projection below removes its radial part.
                grad_weights = (unit * row_factor[:, None]).t() @ buffer
                target_part = unit * (grad_target * inverse_weight_norms[labels])[:, None]
                grad_weights.index_add_(1, labels, target_part.t())
                if grad_nearest is not None:
                    nearest_scale = grad_nearest * inverse_weight_norms[nearest_columns]
                    nearest_part = unit[nearest_rows] * nearest_scale[:, None]
                    grad_weights.index_add_(1, nearest_columns, nearest_part.t())
                radial = column_dots(weights, grad_weights)
                radial.mul_(inverse_weight_norms.square()).masked_fill_(weight_clamped, 0.0)
                grad_weights.addcmul_(weights, radial[None, :], value=-1.0)
        return grad_embeddings, grad_weights, None, None, None


def fused_nontarget_logsumexp(
    embeddings: torch.Tensor,
    weights: torch.Tensor,
    labels: torch.Tensor,
    scale: float,
    *,
    with_margins: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(u, t, γ)`` for embeddings (N, d), prototypes ``weights`` (d, C) and labels (N,).

    ``u_i = log Σ_{j≠y_i} exp(s·cos_ij)``, ``t_i = cos_{i,y_i}``; both differentiable with respect
    to ``embeddings`` and ``weights`` (same dtype and device, at least 2 classes; no checks here,
    the losses validate). ``γ`` holds the sample margins ``t_i − max_{j≠y_i} cos_ij`` when
    ``with_margins`` is true, else ``None``: the values of
    :func:`pml_largest_margin.margins.sample_margins_from_cosines` on the same cosines, and
    differentiable too, with its gradient (ties among the nearest non-target classes share the
    −1 evenly, as with ``torch.amax``).
    """
    nontarget_lse, target, margins = _NonTargetLogSumExp.apply(
        embeddings, weights, labels, float(scale), bool(with_margins)
    )
    return nontarget_lse, target, margins if with_margins else None
