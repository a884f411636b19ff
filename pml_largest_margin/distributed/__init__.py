"""Class-parallel largest-margin losses over torch.distributed (NCCL on GPUs, gloo on CPUs)."""

from .checkpoints import consolidate_class_parallel_checkpoint, shard_class_parallel_checkpoint
from .class_parallel_generalized_margin_softmax_loss import (
    ClassParallelGeneralizedMarginSoftmaxLoss,
)
from .class_parallel_largest_margin_softmax_loss import ClassParallelLargestMarginSoftmaxLoss
from .class_parallel_loss_base import ClassParallelLossBase
from .class_parallel_margin_head_loss import ClassParallelMarginHeadLoss
from .class_parallel_zero_centroid_regularizer import ClassParallelZeroCentroidRegularizer
from .sharding import shard_bounds

__all__ = [
    "ClassParallelGeneralizedMarginSoftmaxLoss",
    "ClassParallelLargestMarginSoftmaxLoss",
    "ClassParallelLossBase",
    "ClassParallelMarginHeadLoss",
    "ClassParallelZeroCentroidRegularizer",
    "consolidate_class_parallel_checkpoint",
    "shard_bounds",
    "shard_class_parallel_checkpoint",
]
