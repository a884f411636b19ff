from __future__ import annotations

import torch
import torch.distributed as dist

from ..losses.base_margin_head_loss import BaseMarginHeadLoss
from ..regularizers import SampleMarginRegularizer
from .class_parallel_loss_base import ClassParallelLossBase


class ClassParallelMarginHeadLoss(ClassParallelLossBase):
    """Any margin head (``AdaFaceLoss``, ``MagFaceLoss``, ``ElasticFaceLoss``, ``AdaCosLoss``,
    ``DynamicMarginLoss``, ``CurricularFaceLoss``, or your own ``BaseMarginHeadLoss``) with its
    prototypes split over the ranks of a process group.

    ``ClassParallelMarginHeadLoss(AdaFaceLoss(num_classes, embedding_size, ...), process_group)``
    computes exactly the single-process head on the concatenated batch with the full W: the head
    only turns ``(u, t)`` and the embedding norms into per-sample losses, so it runs on (N,)
    vectors after the exact sharded statistics (``ClassParallelLossBase`` describes the sharding,
    gradient and sampling conventions). A dynamic AdaCos scale takes one more sharded pass without
    gradient, on the same scored classes.

    The wrapper takes the head over: its hyperparameters, its running statistics (registered
    buffers, saved as ``head.*`` in this loss's ``state_dict``) and this rank's columns of its W,
    which it then drops from the head, so the full W exists only while the head is being built
    (``d·C`` numbers on each rank; build every rank's head from the same seed to start from the
    single-process W). The head's statistics are computed on the gathered batch, the same on every
    rank, so they stay identical without an all-reduce: the head must have no ``process_group``.
    Random draws of the head (ElasticFace's margins) are broadcast from the group's first rank,
    so every rank uses the same ones. Reducer, miner weights, regularizers and ``collect_stats``
    are this loss's (pass them here, not to the head).

    ``memory=`` (this loss's) chooses buffer or streaming on each rank, for every head.
    CurricularFace runs its own sharded kernel: its modulated non-target logits need the
    hard-negative thresholds, which come from the target cosines, all-reduced first; its ``T``
    is the mean target cosine of the gathered batch, the same on every rank.
    """

    def __init__(
        self,
        head: BaseMarginHeadLoss,
        process_group: dist.ProcessGroup | None = None,
        sample_margin_regularizer: SampleMarginRegularizer | None = None,
        **kwargs,
    ) -> None:
        if not isinstance(head, BaseMarginHeadLoss):
            raise TypeError(f"head must be a BaseMarginHeadLoss, got {type(head).__name__}")
        if sample_margin_regularizer is not None and not head.supports_sample_margin_regularizer:
            raise ValueError(f"{type(head).__name__} does not take a sample_margin_regularizer")
        if head.process_group is not None:
            raise ValueError(
                "the head's statistics are taken on the gathered batch, identical on every rank; "
                "build the head without process_group"
            )
        if head.W is None:
            raise ValueError("this head has already been taken over by a class-parallel loss")
        super().__init__(
            head.num_classes,
            head.embedding_size,
            head.scale,
            process_group=process_group,
            sample_margin_regularizer=sample_margin_regularizer,
            **kwargs,
        )
        self.W.data = self.W.data.to(head.W.dtype)
        self.load_full_W(head.W.detach())
        head.register_parameter("W", None)
        head.replica_group = dist.group.WORLD if process_group is None else process_group
        self.head = head

    def per_sample_losses_and_margins(
        self, embeddings: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        weights, local_targets = self._scored_columns(labels)
        dtype = torch.promote_types(
            torch.promote_types(embeddings.dtype, self.W.dtype), torch.float32
        )
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return self.head.class_parallel_losses(
                embeddings.to(dtype),
                weights.to(dtype),
                local_targets,
                labels,
                self.process_group,
                self.memory,
                track_max=self.sample_margin_regularizer is not None,
            )
