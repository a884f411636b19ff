"""AdaCos: NormFace with a scale set from the number of classes, fixed or per batch (Zhang et al., CVPR 2019)."""

from __future__ import annotations

import math

import torch

from ._angles import arccos
from .base_margin_head_loss import BaseMarginHeadLoss, CosineStatistics


class AdaCosLoss(BaseMarginHeadLoss):
    """AdaCos (docs/theory.md §7.4): no margin, ``ψ(θ) = cos θ``; only the scale adapts.

    Fixed (``dynamic=False``): ``s = √2·log(C − 1)``, the GM-Softmax ``normface`` setting at that
    scale. Dynamic (``dynamic=True``): the scale starts at the fixed value and, in training mode,
    each batch first sets (without gradient)

        s ← log(B_avg) / cos(min(π/4, θ_med)),   B_avg = (1/N) Σ_i Σ_{j≠y_i} e^{s_old·cos θ_ij},

    ``θ_med`` the median target angle of the batch (``torch.median``, the lower middle value for
    an even count, as in the reference), then computes the loss with the new ``s``. That costs one
    extra forward pass of the kernel (no gradient, its buffer freed before the loss's). The scale
    lives in the buffer ``running_scale`` (in ``state_dict``), frozen in ``eval()``; with
    ``process_group`` ``B_avg`` and the median are taken over the concatenated batch of all ranks.
    :meth:`get_logits` uses the current scale. Needs ``C >= 3`` (``log(C − 1) > 0``).
    """

    def __init__(self, num_classes: int, embedding_size: int, dynamic: bool = True, **kwargs):
        if "scale" in kwargs:
            raise ValueError("AdaCosLoss sets its own scale; do not pass scale")
        if int(num_classes) != num_classes or num_classes < 3:
            raise ValueError(
                f"AdaCos needs num_classes >= 3 (s = √2·log(C − 1)), got {num_classes}"
            )
        fixed_scale = math.sqrt(2.0) * math.log(num_classes - 1)
        super().__init__(num_classes, embedding_size, fixed_scale, **kwargs)
        self.dynamic = bool(dynamic)
        self.register_buffer("running_scale", torch.tensor(fixed_scale, dtype=torch.float64))
        self.add_to_recordable_attributes(list_of_names=["dynamic"], is_stat=False)

    def batch_scale(self, cosine_statistics: CosineStatistics) -> float:
        if self.dynamic and self.training:
            with torch.no_grad():
                nontarget_lse, target, _ = cosine_statistics(float(self.running_scale), False)
                self.running_scale.fill_(self.next_scale(nontarget_lse, target))
        return float(self.running_scale)

    @torch.no_grad()
    def next_scale(self, nontarget_lse: torch.Tensor, target_cosines: torch.Tensor) -> float:
        """``log(B_avg)/cos(min(π/4, θ_med))`` from ``u`` at the old scale and the target cosines."""
        lse = nontarget_lse.double()
        # log B_avg = log Σ_i e^{u_i} − log N, with the maximum taken out (over all ranks).
        top = self.reduce_over_ranks(lse.max(), op=torch.distributed.ReduceOp.MAX)
        sums = self.reduce_over_ranks(
            torch.stack([(lse - top).exp().sum(), lse.new_tensor(len(lse))])
        )
        log_mean = top + sums[0].log() - sums[1].log()
        median_angle = torch.median(self.gather_over_ranks(arccos(target_cosines.double())))
        return float(log_mean / torch.cos(median_angle.clamp_max(math.pi / 4)))

    def target_logits(
        self, target_cosines: torch.Tensor, norms: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        return target_cosines

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``s · cos θ_ij`` at the current scale, shape (N, num_classes)."""
        return super().get_logits(embeddings) * (float(self.running_scale) / self.scale)
