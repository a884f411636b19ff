"""LM-Softmax, the largest-margin softmax loss of Zhou et al. (ICLR 2022), as a PML loss."""

from __future__ import annotations

import torch

from .base_margin_softmax_loss import DEFAULT_LM_SOFTMAX_SCALE, BaseMarginSoftmaxLoss
from .functional import largest_margin_softmax_head


class LargestMarginSoftmaxLoss(BaseMarginSoftmaxLoss):
    """LM-Softmax: ``L_i = (1/s)·log Σ_{j≠y_i} exp(s·(cos θ_ij − cos θ_{i,y_i}))`` (docs/theory.md §3).

    The target term is dropped from the denominator, which makes ``L_i`` a smooth upper bound of
    the negative sample margin: ``−γ_i ≤ L_i ≤ −γ_i + log(C−1)/s``. Minimising it maximises the
    sample margins; the ``1/s`` factor (from the authors' code) makes the gradient on the cosines
    ``−1`` at the target and the softmax over the other classes elsewhere, whatever ``s``.

    Args:
        num_classes: C >= 2.
        embedding_size: d, the embeddings' dimension.
        scale: ``s > 0``. The default 32 keeps the bound's slack ``log(C−1)/s`` at 0.14 for
            C = 100 and 0.36 for C = 100,000 (so the loss tracks the margin closely), while the
            softmax over non-target classes still spreads the gradient over the nearest few
            competitors instead of the single closest one, which is what a very large ``s`` does.
        validate_inputs: check embeddings for NaN/Inf (see :class:`BaseMarginSoftmaxLoss`).
        **kwargs: ``sample_margin_regularizer`` and ``sample_margin_reg_weight`` (λ·R_sm from the
            kernel's own margins, see :class:`BaseMarginSoftmaxLoss`), PML's
            ``weight_regularizer``, ``weight_reg_weight``, ``weight_init_func``,
            ``embedding_regularizer``, ``reducer``, ``collect_stats``...

    ``W`` has shape (embedding_size, num_classes). With ``collect_stats=True`` the loss records
    ``mean_sample_margin`` and ``min_sample_margin`` of each batch. Forward and backward run in
    a fused kernel (:mod:`pml_largest_margin.losses.fused`): three matrix products and one batch ×
    classes buffer, or with ``memory="stream"`` (chosen by ``"auto"`` for large batch × classes)
    four products and no batch × classes tensor.

    Under PML's ``DistributedLossWrapper`` every rank computes the loss over the gathered global
    batch and the wrapper multiplies it by the world size, so ``W.grad`` is the same on every rank
    and equals ``world_size`` times the gradient of the global-batch mean loss. Ranks stay in sync
    without an all-reduce of ``W.grad`` (averaging it changes nothing); divide the learning rate
    of ``W`` by the world size to match single-process training. ``efficient=True`` passes
    ``ref_emb``, which this loss (like PML's ``ArcFaceLoss``) does not support.

    ``sub_centers=k`` gives each class k prototypes (W of shape (d, C·k), PML's
    ``SubCenterArcFaceLoss`` layout): a class's cosine is its best sub-centre's. That maximum
    comes before the log-sum-exp, so it runs through autograd on the (N, C·k) cosines, or
    with ``memory="stream"`` over blocks of classes (:mod:`._sub_centers`).
    """

    supports_sub_centers = True

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        scale: float = DEFAULT_LM_SOFTMAX_SCALE,
        **kwargs,
    ):
        super().__init__(num_classes, embedding_size, scale, **kwargs)

    def per_sample_losses(
        self,
        embeddings: torch.Tensor,
        weights: torch.Tensor,
        labels: torch.Tensor,
        with_margins: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        nontarget_lse, target, margins = self.cosine_statistics(
            embeddings, weights, labels, self.scale, with_margins
        )
        return largest_margin_softmax_head(nontarget_lse, target, self.scale), margins
