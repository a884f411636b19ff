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
buffer and (N, d) or (C,) vectors. The saved buffer is never overwritten, so ``retain_graph`` and
``gradcheck`` work. Everything runs in the dtype of the inputs with autocast disabled.
"""

from __future__ import annotations

import math

import torch

from ..margins import sample_margins_from_cosines

# Norms below this are clamped, as torch.nn.functional.normalize does.
_NORM_EPS = 1e-12
# Columns per block when taking column-wise dot products of two (d, C) matrices.
_COLUMN_BLOCK = 4096


def _column_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
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
            inverse_embedding_norms = embedding_norms.clamp_min(_NORM_EPS).reciprocal()
            unit = embeddings * inverse_embedding_norms[:, None]
            weight_norms = torch.linalg.vector_norm(weights, dim=0)
            inverse_weight_norms = weight_norms.clamp_min(_NORM_EPS).reciprocal()
            columns = labels.long()[:, None]

            buffer = unit @ weights
            buffer.mul_(inverse_weight_norms)
            target = buffer.gather(1, columns).squeeze(1)
            if with_margins:
                margins = sample_margins_from_cosines(buffer, labels)
            else:
                margins = buffer.new_empty(0)
            buffer.scatter_(1, columns, -math.inf)
            row_max = buffer.amax(dim=1)
            torch.sub(buffer, row_max[:, None], out=buffer)
            buffer.mul_(scale).exp_()
            row_sums = buffer.sum(dim=1)
            nontarget_lse = scale * row_max + row_sums.log()
            buffer.mul_(inverse_weight_norms)

        ctx.scale = scale
        ctx.save_for_backward(
            unit,
            inverse_embedding_norms,
            embedding_norms < _NORM_EPS,
            weights,
            inverse_weight_norms,
            weight_norms < _NORM_EPS,
            columns,
            buffer,
            row_sums,
        )
        ctx.mark_non_differentiable(margins)
        return nontarget_lse, target, margins

    @staticmethod
    def backward(ctx, grad_lse, grad_target, _grad_margins):
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
        ) = ctx.saved_tensors
        need_embeddings, need_weights = ctx.needs_input_grad[:2]
        if grad_lse is None:
            grad_lse = torch.zeros_like(row_sums)
        if grad_target is None:
            grad_target = torch.zeros_like(row_sums)
        labels = columns.squeeze(1)
        row_factor = grad_lse * ctx.scale / row_sums
        grad_embeddings = grad_weights = None

        with torch.autocast(device_type=unit.device.type, enabled=False):
            if need_embeddings:
                target_units = weights[:, labels].t() * inverse_weight_norms[labels, None]
                grad_unit = (buffer @ weights.t()).mul_(row_factor[:, None])
                grad_unit.addcmul_(target_units, grad_target[:, None])
                grad_embeddings = _normalisation_backward(
                    grad_unit, unit, inverse_embedding_norms, embedding_clamped
                )
            if need_weights:
                # Column j holds ∂L/∂ŵ_j / ‖w_j‖; the projection below removes its radial part.
                grad_weights = (unit * row_factor[:, None]).t() @ buffer
                target_part = unit * (grad_target * inverse_weight_norms[labels])[:, None]
                grad_weights.index_add_(1, labels, target_part.t())
                radial = _column_dots(weights, grad_weights)
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
    the losses validate). ``γ`` holds the sample margins
    (:func:`pml_largest_margin.margins.sample_margins_from_cosines`, no gradient) when
    ``with_margins`` is true, else ``None``.
    """
    nontarget_lse, target, margins = _NonTargetLogSumExp.apply(
        embeddings, weights, labels, float(scale), bool(with_margins)
    )
    return nontarget_lse, target, margins if with_margins else None
