from __future__ import annotations

import torch
import torch.distributed as dist

from ..losses.base_margin_head_loss import BaseMarginHeadLoss
from ._sharded_cosine_statistics import sharded_cosine_statistics
from .class_parallel_loss_base import ClassParallelLossBase


class ClassParallelMarginHeadLoss(ClassParallelLossBase):
    """Any margin head (``AdaFaceLoss``, ``MagFaceLoss``, ``ElasticFaceLoss``, ``AdaCosLoss``,
    ``DynamicMarginLoss``, or your own ``BaseMarginHeadLoss``) with its prototypes split over the
    ranks of a process group.

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
    """

    def __init__(
        self, head: BaseMarginHeadLoss, process_group: dist.ProcessGroup | None = None, **kwargs
    ) -> None:
        if not isinstance(head, BaseMarginHeadLoss):
            raise TypeError(f"head must be a BaseMarginHeadLoss, got {type(head).__name__}")
        if not head.supports_class_parallel:
            raise TypeError(f"{type(head).__name__} has no class-parallel version")
        if head.process_group is not None:
            raise ValueError(
                "the head's statistics are taken on the gathered batch, identical on every rank; "
                "build the head without process_group"
            )
        if head.W is None:
            raise ValueError("this head has already been taken over by a class-parallel loss")
        super().__init__(
            head.num_classes, head.embedding_size, head.scale, process_group=process_group, **kwargs
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
        unit_embeddings = torch.nn.functional.normalize(embeddings, dim=1)
        track_max = self.sample_margin_regularizer is not None

        def cosine_statistics(scale: float, with_margins: bool):
            statistics = sharded_cosine_statistics(
                unit_embeddings,
                weights,
                local_targets,
                scale,
                self.process_group,
                track_max=track_max and with_margins,
            )
            margins = statistics.target_cosine - statistics.non_target_max
            return statistics.non_target_logsumexp, statistics.target_cosine, margins

        dtype = torch.promote_types(
            torch.promote_types(embeddings.dtype, self.W.dtype), torch.float32
        )
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            norms = torch.linalg.vector_norm(embeddings.to(dtype), dim=1)
            return self.head.head_losses(cosine_statistics, norms, labels, with_margins=True)
