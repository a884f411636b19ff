from __future__ import annotations

import torch

from ..losses.base_margin_softmax_loss import DEFAULT_LM_SOFTMAX_SCALE
from ..losses.functional import largest_margin_softmax_head
from ._sharded_cosine_statistics import ShardedCosineStatistics
from .class_parallel_loss_base import ClassParallelLossBase


class ClassParallelLargestMarginSoftmaxLoss(ClassParallelLossBase):
    """LM-Softmax with its prototypes split over the ranks of a process group.

    ``L_i = (1/s) · log Σ_{j≠y_i} exp(s · (cos_ij − cos_{i,y_i}))``, exactly as the single-process
    ``LargestMarginSoftmaxLoss`` on the concatenated batch with the full W; see
    ``ClassParallelLossBase`` for the sharding, gradient and sampling conventions.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        scale: float = DEFAULT_LM_SOFTMAX_SCALE,
        **kwargs,
    ):
        super().__init__(num_classes, embedding_size, scale, **kwargs)

    def losses_from_statistics(self, statistics: ShardedCosineStatistics) -> torch.Tensor:
        return largest_margin_softmax_head(
            statistics.non_target_logsumexp, statistics.target_cosine, self.scale
        )
