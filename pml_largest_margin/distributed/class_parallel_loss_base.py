"""Shared machinery of the class-parallel losses: class sharding, batch gathering, sampling."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.losses.mixins import WeightRegularizerMixin
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from ..losses.fused import check_memory_mode
from ..regularizers import SampleMarginRegularizerMixin
from ._collectives import (
    all_gather_rows,
    check_and_exchange_batch,
    flat_mined_indices,
    gather_rows_with_gradient,
    rank,
    world_size,
)
from ._sharded_cosine_statistics import ShardedCosineStatistics, sharded_cosine_statistics
from .sharding import shard_bounds


class ClassParallelLossBase(
    SampleMarginRegularizerMixin, WeightRegularizerMixin, BaseMetricLossFunction
):
    """A PML loss whose prototypes W (d, C) are split by columns over the ranks of a process group.

    Every rank calls ``loss(embeddings, labels)`` with its own part of the batch (sizes may
    differ). The batch is gathered with gradient, each rank scores it against its own
    ``class_range`` of classes, and the per-sample statistics are combined exactly by all-reduces,
    so the loss value is the single-process loss on the concatenated batch with the full W, on
    every rank. Gradients: each rank's ``W`` receives its exact slice of the single-process
    gradient; the local embeddings receive ``world_size`` times their single-process gradient,
    which DDP's gradient averaging over the same group turns into the single-process backbone
    gradient. Keep W out of DDP (it belongs to this loss, not to the wrapped backbone).

    ``sample_rate < 1`` (training mode only) keeps, on each rank, the classes of the batch plus
    a random subset of the other classes, ``ceil(sample_rate · C_local)`` in all (PartialFC's
    scheme). This is an approximation: the dropped classes leave the softmax denominator, and
    their prototypes get no gradient in that step.

    ``sample_margin_regularizer=SampleMarginRegularizer()`` with ``sample_margin_reg_weight``
    λ adds ``λ · R_sm`` as the sub-loss ``sample_margin_loss``, exactly as the single-process
    losses do through ``SampleMarginRegularizerMixin``: the regularizer gets the exact sample
    margins ``γ_i = cos_{i,y_i} − max_{j≠y_i} cos_ij`` (the maximum all-reduced over ranks) and
    applies its own miner weighting, reducer and stats. A ``weight_regularizer`` receives this
    rank's ``W.t()`` slice only: use a sharded one such as
    ``ClassParallelZeroCentroidRegularizer``.

    With ``collect_stats=True`` the loss records ``mean_sample_margin`` and
    ``min_sample_margin`` over the whole gathered batch (the same on every rank). Under class
    sampling the margins, like the loss, only see the kept classes.

    A miner's ``indices_tuple`` weights the per-sample terms of both sub-losses as in PML's
    ``ArcFaceLoss``; see :meth:`forward`.

    ``memory="buffer" | "stream" | "auto"`` chooses, on each rank, between one batch × local
    classes buffer and streaming over this rank's columns in blocks (exact either way; see
    :mod:`pml_largest_margin.losses.fused`, docs/losses.md "Memory").
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        scale: float,
        process_group=None,
        sample_rate: float = 1.0,
        generator: torch.Generator | None = None,
        memory: str = "auto",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.memory = check_memory_mode(memory)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("class-parallel losses need torch.distributed to be initialised")
        ranks = world_size(process_group)
        if not isinstance(num_classes, int) or num_classes < max(2, ranks):
            raise ValueError(
                f"num_classes must be an integer >= max(2, world size = {ranks}), got {num_classes}"
            )
        if not isinstance(embedding_size, int) or embedding_size < 1:
            raise ValueError(f"embedding_size must be a positive integer, got {embedding_size}")
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be positive and finite, got {scale}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}")
        if not math.isfinite(self.sample_margin_reg_weight):
            raise ValueError(
                f"sample_margin_reg_weight must be finite, got {self.sample_margin_reg_weight}"
            )
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.scale = float(scale)
        self.sample_rate = float(sample_rate)
        self.process_group = process_group
        self.generator = generator
        self.class_range = shard_bounds(num_classes, ranks, rank(process_group))
        self.W = torch.nn.Parameter(torch.empty(embedding_size, self.num_local_classes))
        self.weight_init_func(self.W)
        self.add_to_recordable_attributes(
            list_of_names=["num_classes", "scale", "sample_rate"], is_stat=False
        )
        self.add_to_recordable_attributes(
            list_of_names=["mean_sample_margin", "min_sample_margin"], is_stat=True
        )

    @property
    def num_local_classes(self) -> int:
        return self.class_range[1] - self.class_range[0]

    @torch.no_grad()
    def load_full_W(self, full_W: torch.Tensor) -> None:
        """Copy this rank's columns out of a full (embedding_size, num_classes) prototype matrix."""
        expected = (self.embedding_size, self.num_classes)
        if tuple(full_W.shape) != expected:
            raise ValueError(f"full_W must have shape {expected}, got {tuple(full_W.shape)}")
        self.W.copy_(full_W[:, self.class_range[0] : self.class_range[1]])

    def forward(self, embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None):
        """``indices_tuple``: a miner's output on this rank's batch (ranks may pass ``None``).
        Samples are weighted as PML's ``convert_to_weights`` weights them in the single-process
        loss given the concatenation of all ranks' tuples, shifted to positions in the gathered
        batch. ``ref_emb`` / ``ref_labels`` are not supported."""
        if ref_emb is not None or ref_labels is not None:
            raise ValueError("class-parallel losses do not support ref_emb / ref_labels")
        sizes, mined_sizes = check_and_exchange_batch(
            embeddings,
            labels,
            self.num_classes,
            self.embedding_size,
            self.W.device,
            self.process_group,
            indices_tuple,
        )
        if sum(sizes) == 0:
            raise ValueError("embeddings are empty on every rank")
        all_embeddings = gather_rows_with_gradient(
            embeddings.to(self.W.device), sizes, self.process_group
        )
        all_labels = all_gather_rows(
            labels.to(self.W.device, torch.int64), sizes, self.process_group
        )
        all_mined = None
        if mined_sizes is not None and sum(mined_sizes):
            local = torch.empty(0, dtype=torch.int64)
            if indices_tuple is not None:
                local = flat_mined_indices(indices_tuple, embeddings.shape[0])
            this_rank = rank(self.process_group)
            local = (local + sum(sizes[:this_rank])).to(self.W.device)
            all_mined = (all_gather_rows(local, mined_sizes, self.process_group),)
        return super().forward(all_embeddings, all_labels, all_mined)

    def losses_from_statistics(self, statistics: ShardedCosineStatistics) -> torch.Tensor:
        """The loss of each gathered sample from the exact sharded statistics."""
        raise NotImplementedError

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        weights, local_targets = self._scored_columns(labels)
        statistics = sharded_cosine_statistics(
            torch.nn.functional.normalize(embeddings, dim=1),
            weights,
            local_targets,
            self.scale,
            self.process_group,
            track_max=self.sample_margin_regularizer is not None,
            memory=self.memory,
        )
        margins = statistics.target_cosine - statistics.non_target_max
        if self.collect_stats:
            self.mean_sample_margin = float(margins.detach().mean())
            self.min_sample_margin = float(margins.detach().min())
        losses = self.losses_from_statistics(statistics)
        miner_weights = lmu.convert_to_weights(indices_tuple, labels, dtype=losses.dtype)
        loss_dict = {
            "loss": {
                "losses": losses * miner_weights,
                "indices": c_f.torch_arange_from_size(embeddings),
                "reduction_type": "element",
            }
        }
        self.add_sample_margin_regularization_to_loss_dict(
            loss_dict, embeddings, labels, indices_tuple, margins=margins
        )
        self.add_weight_regularization_to_loss_dict(loss_dict, self.W.t())
        return loss_dict

    def _scored_columns(self, labels: torch.Tensor):
        """This rank's prototype columns to score and each sample's target column among them."""
        start, stop = self.class_range
        owned = (labels >= start) & (labels < stop)
        local_targets = torch.where(owned, labels - start, -1)
        if not self.training or self.sample_rate == 1:
            return self.W, local_targets
        num_kept = max(1, math.ceil(self.sample_rate * self.num_local_classes))
        positives = torch.unique(local_targets[owned])
        if positives.numel() >= num_kept:
            kept = positives
        else:
            priority = torch.rand(
                self.num_local_classes, generator=self.generator, device=self.W.device
            )
            priority[positives] = 2.0  # above any uniform draw: the batch's classes always stay
            kept = torch.topk(priority, num_kept, sorted=False).indices.sort().values
        position = torch.full((self.num_local_classes,), -1, device=labels.device)
        position[kept] = torch.arange(kept.numel(), device=labels.device)
        local_targets = torch.where(owned, position[local_targets.clamp_min(0)], -1)
        return self.W[:, kept], local_targets
