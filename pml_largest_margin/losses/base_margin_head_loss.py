"""Margin heads as GM-Softmax with a per-sample target function ψ_i (docs/theory.md §7)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist

from .base_margin_softmax_loss import BaseMarginSoftmaxLoss
from .functional import generalized_margin_softmax_head

# (scale, with_margins) -> (u, t, γ or None): u_i = log Σ_{j≠y_i} exp(s·cos_ij), t_i = cos_{i,y_i},
# γ_i = t_i − max_{j≠y_i} cos_ij; from the fused kernel, or from class-parallel shards.
CosineStatistics = Callable[[float, bool], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


class BaseMarginHeadLoss(BaseMarginSoftmaxLoss):
    """``L_i = log(1 + Σ_{j≠y_i} e^{s·cos θ_ij} / e^{s·ψ_i(cos θ_{i,y_i})}) + P_i``.

    The adaptive-margin heads keep the non-target logits plain cosines and change only the target
    logit, per sample: ψ_i may depend on the feature norm ``‖z_i‖`` (AdaFace, MagFace), a random
    draw (ElasticFace), the class (dynamic margins) or running statistics of the batch; ``P_i``
    is a per-sample penalty on the norm (MagFace), ``s`` may be set per batch (AdaCos). Hence
    every head is ``generalized_margin_softmax_head(u, ψ_i(t), s)`` on the ``(u, t)`` of the
    fused kernel (:func:`~pml_largest_margin.losses.fused.fused_nontarget_logsumexp`): no batch ×
    classes buffer beyond the kernel's. The embeddings reach :meth:`per_sample_losses`
    unnormalised, so the norms are exact and differentiable.

    Subclasses implement :meth:`target_logits` and, where needed, :meth:`norm_penalties` and
    :meth:`batch_scale`; :meth:`head_losses` combines them, and the class-parallel
    :class:`~pml_largest_margin.distributed.ClassParallelMarginHeadLoss` calls it (through
    :meth:`class_parallel_losses`) with sharded statistics instead of the fused kernel. A head
    whose non-target logits are not plain cosines (CurricularFace) overrides
    :meth:`per_sample_losses` and :meth:`class_parallel_losses` instead.

    Running statistics are registered buffers (saved in ``state_dict``), updated in training mode
    only and frozen in ``eval()``. With ``process_group`` (a ``torch.distributed`` group; pass
    ``torch.distributed.group.WORLD`` for the default one) the batch statistics behind them are
    all-reduced over the group's ranks, so every rank of a DDP job uses and stores the statistics
    of the global batch and the ranks stay identical. ``None`` (default): this process's batch
    only (right for a single process and under PML's ``DistributedLossWrapper``, which already
    hands every rank the gathered batch).
    """

    @property
    def supports_class_parallel(self) -> bool:
        """Deprecated: every head has a class-parallel version now; see the capability flags
        ``supports_stream`` and ``supports_sample_margin_regularizer``."""
        warnings.warn(
            "supports_class_parallel is deprecated: every margin head runs under "
            "ClassParallelMarginHeadLoss; read supports_stream or "
            "supports_sample_margin_regularizer instead",
            DeprecationWarning,
            stacklevel=2,
        )
        return True

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        scale: float,
        process_group: dist.ProcessGroup | None = None,
        **kwargs,
    ):
        super().__init__(num_classes, embedding_size, scale, **kwargs)
        if process_group is not None and not dist.is_initialized():
            raise RuntimeError("process_group was given but torch.distributed is not initialised")
        self.process_group = process_group
        # Set by a class-parallel wrapper: the group over which the batch is replicated, so
        # that random draws must agree (see broadcast_from_first_rank).
        self.replica_group = None

    def target_logits(
        self, target_cosines: torch.Tensor, norms: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """``ψ_i(t_i)`` (N,) from the target cosines, the embedding norms and the labels."""
        raise NotImplementedError

    def norm_penalties(self, norms: torch.Tensor) -> torch.Tensor | None:
        """The per-sample penalty ``P_i`` on the norms, or ``None`` (the default) for none."""
        return None

    def batch_scale(self, cosine_statistics: CosineStatistics) -> float:
        """The scale ``s`` of this batch; the default is the constant ``scale``."""
        return self.scale

    def head_losses(
        self,
        cosine_statistics: CosineStatistics,
        norms: torch.Tensor,
        labels: torch.Tensor,
        with_margins: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sample losses (N,) and sample margins (or ``None``) of the gathered batch."""
        scale = self.batch_scale(cosine_statistics)
        nontarget_lse, target, margins = cosine_statistics(scale, with_margins)
        losses = generalized_margin_softmax_head(
            nontarget_lse, self.target_logits(target, norms, labels), scale
        )
        penalties = self.norm_penalties(norms)
        return (losses if penalties is None else losses + penalties), margins

    def per_sample_losses(
        self,
        embeddings: torch.Tensor,
        weights: torch.Tensor,
        labels: torch.Tensor,
        with_margins: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        def statistics(scale: float, margins_too: bool):
            return self.cosine_statistics(embeddings, weights, labels, scale, margins_too)

        norms = torch.linalg.vector_norm(embeddings, dim=1)
        return self.head_losses(statistics, norms, labels, with_margins)

    def class_parallel_losses(
        self,
        embeddings: torch.Tensor,
        weights: torch.Tensor,
        local_targets: torch.Tensor,
        labels: torch.Tensor,
        group: dist.ProcessGroup | None,
        memory: str,
        track_max: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample losses and sample margins (N,) of the gathered batch ``embeddings`` when
        ``weights`` holds this rank's columns of W (``local_targets``: each sample's column among
        them, −1 where another rank of ``group`` holds its class); identical on every rank.

        Called by :class:`~pml_largest_margin.distributed.ClassParallelMarginHeadLoss`; this
        default runs :meth:`head_losses` on the exact sharded statistics, whose maximum is
        differentiable with ``track_max`` (for the sample-margin regularizer).
        """
        # Imported here: the distributed package imports the losses.
        from ..distributed._sharded_cosine_statistics import sharded_cosine_statistics

        unit_embeddings = torch.nn.functional.normalize(embeddings, dim=1)

        def statistics(scale: float, with_margins: bool):
            sharded = sharded_cosine_statistics(
                unit_embeddings, weights, local_targets, scale, group,
                track_max=track_max and with_margins, memory=memory,
            )  # fmt: skip
            margins = sharded.target_cosine - sharded.non_target_max
            return sharded.non_target_logsumexp, sharded.target_cosine, margins

        norms = torch.linalg.vector_norm(embeddings, dim=1)
        return self.head_losses(statistics, norms, labels, with_margins=True)

    @torch.no_grad()
    def reduce_over_ranks(
        self, values: torch.Tensor, op: dist.ReduceOp | None = None
    ) -> torch.Tensor:
        """``values`` reduced over ``process_group`` (sum, or ``op``); unchanged without a group."""
        if self.process_group is None:
            return values
        reduced = values.clone()
        dist.all_reduce(reduced, op=op or dist.ReduceOp.SUM, group=self.process_group)
        return reduced

    @torch.no_grad()
    def gather_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """The concatenation over ``process_group`` of every rank's 1-D ``values``, in rank order."""
        if self.process_group is None:
            return values
        size = torch.tensor([values.numel()], device=values.device)
        sizes = [torch.empty_like(size) for _ in range(dist.get_world_size(self.process_group))]
        dist.all_gather(sizes, size, group=self.process_group)
        # Imported here: the distributed package imports the losses.
        from ..distributed._collectives import all_gather_rows

        return all_gather_rows(values, [int(s) for s in sizes], self.process_group)

    @torch.no_grad()
    def broadcast_from_first_rank(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` as drawn on the first rank of ``replica_group`` (in place); unchanged
        without one."""
        if self.replica_group is not None:
            group = self.replica_group
            dist.broadcast(values, src=dist.get_global_rank(group, 0), group=group)
        return values
