"""CurricularFace: hard negatives weighted up as training progresses (Huang et al., CVPR 2020)."""

from __future__ import annotations

import math

import torch

from ._angles import additive_angular_margin, arccos
from .base_margin_head_loss import BaseMarginHeadLoss, CosineStatistics
from .base_margin_softmax_loss import DEFAULT_SCALE
from .functional import generalized_margin_softmax_head
from .fused import NORM_EPS, clamped_normalisation, column_dots

# Elements per row block of the buffer while the hard negatives are modulated (block temporaries
# of 16 MB in float32, whatever N × C).
_BLOCK_ELEMENTS = 2**22


def _unit_rows_backward(grad_unit, unit, inverse_norms, clamped):
    """Gradient through ``x/max(‖x‖, eps)`` for rows: a projection, plain scaling where clamped."""
    radial = (unit * grad_unit).sum(dim=1, keepdim=True).masked_fill_(clamped[:, None], 0.0)
    return (grad_unit - unit * radial) * inverse_norms[:, None]


class _ModulatedNonTargetLogSumExp(torch.autograd.Function):
    """``u_i = log Σ_{j≠y_i} exp(s·φ_ij)``, ``φ_ij = cos_ij·(T + cos_ij)`` where ``cos_ij > c_i``,
    else ``cos_ij``; also ``t_i = cos_{i,y_i}`` and ``max_{j≠y_i} cos_ij`` (no gradient).

    The approach of :mod:`pml_largest_margin.losses.fused`: one (N, C) buffer holds the cosines,
    then, row block by row block, ``exp(s·(φ − max))·φ'`` with ``φ' = T + 2·cos`` on the hard
    negatives and 1 elsewhere, which is all the backward pass needs: with ``r_i = s·∂/∂u_i / Σ_i``
    the cosine gradient is ``r_i`` times the buffer, so backward is the fused kernel's two
    matrix products and normalisation projections. The thresholds ``c_i`` only select the hard
    negatives (a piecewise-constant choice) and get no gradient.
    """

    @staticmethod
    def forward(ctx, embeddings, weights, labels, thresholds, hardness, scale):
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            (
                unit,
                inverse_embedding_norms,
                embedding_clamped,
                inverse_weight_norms,
                weight_clamped,
            ) = clamped_normalisation(embeddings, weights)
            columns = labels.long()[:, None]

            buffer = unit @ weights
            buffer.mul_(inverse_weight_norms)
            target = buffer.gather(1, columns).squeeze(1)
            buffer.scatter_(1, columns, -math.inf)
            nontarget_max = buffer.new_empty(len(target))
            row_sums = buffer.new_empty(len(target))
            nontarget_lse = buffer.new_empty(len(target))
            rows_per_block = max(1, _BLOCK_ELEMENTS // max(1, buffer.shape[1]))
            for start in range(0, buffer.shape[0], rows_per_block):
                rows = slice(start, start + rows_per_block)
                cosines = buffer[rows]
                nontarget_max[rows] = cosines.amax(dim=1)
                hard = cosines > thresholds[rows, None]  # the target's −inf never is
                logits = torch.where(hard, cosines * (hardness + cosines), cosines)
                top = logits.amax(dim=1, keepdim=True)
                exponentials = logits.sub_(top).mul_(scale).exp_()
                sums = exponentials.sum(dim=1)
                row_sums[rows] = sums
                nontarget_lse[rows] = scale * top.squeeze(1) + sums.log()
                slopes = torch.where(hard, hardness + 2 * cosines, 1.0)
                cosines.copy_(exponentials.mul_(slopes))
            buffer.mul_(inverse_weight_norms)

        ctx.scale = scale
        ctx.save_for_backward(
            unit,
            inverse_embedding_norms,
            embedding_clamped,
            weights,
            inverse_weight_norms,
            weight_clamped,
            columns,
            buffer,
            row_sums,
        )
        ctx.mark_non_differentiable(nontarget_max)
        return nontarget_lse, target, nontarget_max

    @staticmethod
    def backward(ctx, grad_lse, grad_target, _grad_max):
        (unit, inverse_embedding_norms, embedding_clamped, weights, inverse_weight_norms,
         weight_clamped, columns, buffer, row_sums) = ctx.saved_tensors  # fmt: skip
        grad_lse = torch.zeros_like(row_sums) if grad_lse is None else grad_lse
        grad_target = torch.zeros_like(row_sums) if grad_target is None else grad_target
        labels = columns.squeeze(1)
        row_factor = grad_lse * ctx.scale / row_sums
        grad_embeddings = grad_weights = None
        with torch.autocast(device_type=unit.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                target_units = weights[:, labels].t() * inverse_weight_norms[labels, None]
                grad_unit = (buffer @ weights.t()).mul_(row_factor[:, None])
                grad_unit.addcmul_(target_units, grad_target[:, None])
                grad_embeddings = _unit_rows_backward(
                    grad_unit, unit, inverse_embedding_norms, embedding_clamped
                )
            if ctx.needs_input_grad[1]:
                grad_weights = (unit * row_factor[:, None]).t() @ buffer
                target_part = unit * (grad_target * inverse_weight_norms[labels])[:, None]
                grad_weights.index_add_(1, labels, target_part.t())
                radial = column_dots(weights, grad_weights)
                radial.mul_(inverse_weight_norms.square()).masked_fill_(weight_clamped, 0.0)
                grad_weights.addcmul_(weights, radial[None, :], value=-1.0)
        return grad_embeddings, grad_weights, None, None, None, None


class CurricularFaceLoss(BaseMarginHeadLoss):
    """CurricularFace (docs/theory.md §7.6): ArcFace whose hard negatives weigh more over time.

    With ``t_i = cos θ_{i,y_i}``, ``c_i = cos(θ_{i,y_i} + m)`` and the running ``T`` (buffer
    ``running_hardness``, starting at 0), each training step first sets, without gradient,
    ``T ← 0.01·mean_i t_i + 0.99·T``, then

        φ_ij = cos θ_ij·(T + cos θ_ij)  if cos θ_ij > c_i (a hard negative),  else cos θ_ij,
        ψ_i = c_i  if t_i > cos(π − m),  else t_i − m·sin(π − m),

    and ``L_i = −log(e^{s·ψ_i} / (e^{s·ψ_i} + Σ_{j≠y_i} e^{s·φ_ij}))``. Defaults are the
    reference repository's (HuangYG123/CurricularFace): ``m = 0.5``, ``s = 64``. ``T`` is frozen
    in ``eval()``; with ``process_group`` the mean is over the concatenated batch of all ranks.

    The non-target logits are modulated, so this head has its own kernel (one batch × classes
    buffer and three matrix products, like the fused kernel, and block-sized temporaries) and no
    class-parallel version. Its sample margins (``collect_stats``) carry no gradient, so it takes
    no ``sample_margin_regularizer``.
    """

    supports_class_parallel = False

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.5,
        scale: float = DEFAULT_SCALE,
        **kwargs,
    ):
        if kwargs.get("sample_margin_regularizer") is not None:
            raise ValueError("CurricularFaceLoss does not take a sample_margin_regularizer")
        super().__init__(num_classes, embedding_size, scale, **kwargs)
        if not (math.isfinite(margin) and 0 <= margin < math.pi):
            raise ValueError(f"margin must lie in [0, π), got {margin}")
        self.margin = float(margin)
        self.register_buffer("running_hardness", torch.tensor(0.0, dtype=torch.float64))
        self.add_to_recordable_attributes(list_of_names=["margin"], is_stat=False)

    @torch.no_grad()
    def update_hardness(self, target_cosines: torch.Tensor) -> None:
        """``T ← 0.01·mean(t) + 0.99·T`` over the batch (of all ranks)."""
        values = target_cosines.double().clamp(-1.0, 1.0)
        sum_and_count = self.reduce_over_ranks(
            torch.stack([values.sum(), values.new_tensor(len(values))])
        )
        self.running_hardness.mul_(0.99).add_(0.01 * sum_and_count[0] / sum_and_count[1])

    def per_sample_losses(
        self,
        embeddings: torch.Tensor,
        weights: torch.Tensor,
        labels: torch.Tensor,
        with_margins: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.no_grad():
            unit = torch.nn.functional.normalize(embeddings, dim=1)
            prototypes = weights[:, labels.long()]
            targets = (unit * prototypes.t()).sum(dim=1) / torch.linalg.vector_norm(
                prototypes, dim=0
            ).clamp_min(NORM_EPS)
            if self.training:
                self.update_hardness(targets)
            thresholds = torch.cos(arccos(targets) + self.margin)
        nontarget_lse, target, nontarget_max = _ModulatedNonTargetLogSumExp.apply(
            embeddings, weights, labels, thresholds, float(self.running_hardness), self.scale
        )
        target_logits = additive_angular_margin(target, self.margin)
        losses = generalized_margin_softmax_head(nontarget_lse, target_logits, self.scale)
        return losses, (target.detach() - nontarget_max) if with_margins else None

    def head_losses(
        self,
        cosine_statistics: CosineStatistics,
        norms: torch.Tensor,
        labels: torch.Tensor,
        with_margins: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError(
            "CurricularFace modulates non-target logits; it has its own kernel"
        )
