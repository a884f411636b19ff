"""Shared machinery of the class-parallel losses: class sharding, batch gathering, sampling."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .._pml import BaseMetricLossFunction, WeightRegularizerMixin, c_f, lmu
from ..losses.fused import DEFAULT_MEMORY, check_memory_mode
from ..regularizers import SampleMarginRegularizerMixin
from ..validation import check_loss_arguments, check_real
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

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _widened(embeddings: torch.Tensor) -> torch.Tensor:
    """Half-precision embeddings (gathered exactly, at half the bytes) as float32, as the
    single-process losses take them: nothing, the normalisation included, rounds in half
    precision, and PML's reducers do not sum the sub-losses in half precision."""
    return embeddings.float() if embeddings.dtype in _HALF_DTYPES else embeddings


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

    Every rank must build the same loss: on every call the ranks compare
    :meth:`settings_that_must_agree` (``num_classes``, ``embedding_size``, ``scale``, the
    margins, the regularizers, ...) in the all-gather that already exchanges the batch sizes,
    and raise the same ``ValueError`` on every rank when any differs.

    An empty batch on every rank gives a zero loss on the graph of the embeddings and of W (zero
    gradients), as the single-process losses do. Half-precision embeddings are gathered as they
    are and widened to float32 before anything else is computed from them, as in the
    single-process losses.

    ``state_dict()`` records ``num_classes`` and this rank's ``class_range`` (as extra state),
    and ``load_state_dict`` refuses a shard of other classes; checkpoints move between world
    sizes through :mod:`pml_largest_margin.distributed.checkpoints`.

    ``memory="buffer" | "stream" | "auto"`` chooses, on each rank, between one batch × local
    classes buffer and streaming over this rank's columns in blocks (exact either way; see
    :mod:`pml_largest_margin.losses.fused`, docs/losses.md "Memory").
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        scale: float,
        process_group: dist.ProcessGroup | None = None,
        sample_rate: float = 1.0,
        generator: torch.Generator | None = None,
        memory: str = DEFAULT_MEMORY,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.memory = check_memory_mode(memory)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("class-parallel losses need torch.distributed to be initialised")
        ranks = world_size(process_group)
        # At least one class per rank (and 2 in all); sample_margin_reg_weight is checked by the mixin.
        num_classes, embedding_size, scale = check_loss_arguments(
            num_classes, embedding_size, scale, min_classes=max(2, ranks)
        )
        sample_rate = check_real(
            sample_rate, "sample_rate", greater_than=0, at_most=1, bounds_text="in (0, 1]"
        )
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.scale = scale
        self.sample_rate = sample_rate
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

    def settings_that_must_agree(self) -> dict[str, object]:
        """The settings that make the ranks' losses one loss (name → value).

        The class, ``num_classes``, ``embedding_size``, the class-sampling rate in effect, and
        every non-stat recordable attribute (PML's ``add_to_recordable_attributes``: ``scale``,
        margins, regularizer weights, ...) of the loss, of its regularizers and of its reducer,
        with their classes. Subclasses extend it for settings not recorded so.
        """
        settings = {
            "loss": type(self).__qualname__,
            "num_classes": self.num_classes,
            "embedding_size": self.embedding_size,
            "sample rate in effect": self.sample_rate if self.training else 1.0,
        }
        parts = {
            "": self,
            "weight_regularizer": self.weight_regularizer,
            "embedding_regularizer": self.embedding_regularizer,
            "sample_margin_regularizer": self.sample_margin_regularizer,
            "reducer": self.reducer,
        }
        for prefix, module in parts.items():
            if prefix:
                settings[prefix] = None if module is None else type(module).__qualname__
            for name in getattr(module, "_record_these", ()):
                settings[f"{prefix}.{name}" if prefix else name] = getattr(module, name)
        return settings

    def get_extra_state(self) -> dict:
        """Saved by ``state_dict()``: which classes this rank's W holds."""
        return {"num_classes": self.num_classes, "class_range": tuple(self.class_range)}

    def set_extra_state(self, state: dict) -> None:
        """Called by ``load_state_dict``: refuse a shard of other classes than this rank's."""
        saved_classes, saved_range = state.get("num_classes"), tuple(state.get("class_range", ()))
        if (saved_classes, saved_range) != (self.num_classes, tuple(self.class_range)):
            raise ValueError(
                f"this checkpoint holds the classes {saved_range} (start, stop) of "
                f"num_classes={saved_classes}, but this rank owns {tuple(self.class_range)} of "
                f"num_classes={self.num_classes}; re-shard it with "
                "pml_largest_margin.distributed.shard_class_parallel_checkpoint"
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

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: tuple | None = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
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
            self.settings_that_must_agree(),
        )
        if sum(sizes) == 0:
            # No sample on any rank: nothing to gather; compute_loss returns a zero loss.
            return super().forward(
                _widened(embeddings.to(self.W.device)), labels.to(self.W.device, torch.int64)
            )
        all_embeddings = _widened(
            gather_rows_with_gradient(embeddings.to(self.W.device), sizes, self.process_group)
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

    def per_sample_losses_and_margins(
        self, embeddings: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Losses and sample margins (N,) of the gathered batch, from the exact sharded
        statistics; the margins are differentiable when a sample-margin regularizer is set."""
        weights, local_targets = self._scored_columns(labels)
        compute_dtype = torch.promote_types(embeddings.dtype, self.W.dtype)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            unit_embeddings = torch.nn.functional.normalize(embeddings.to(compute_dtype), dim=1)
        statistics = sharded_cosine_statistics(
            unit_embeddings,
            weights,
            local_targets,
            self.scale,
            self.process_group,
            track_max=self.sample_margin_regularizer is not None,
            memory=self.memory,
        )
        margins = statistics.target_cosine - statistics.non_target_max
        return self.losses_from_statistics(statistics), margins

    def compute_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: tuple | None,
        ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> dict:
        if embeddings.shape[0] == 0:
            return self._zero_loss_dict(embeddings)
        losses, margins = self.per_sample_losses_and_margins(embeddings, labels)
        if self.collect_stats:
            self.mean_sample_margin = float(margins.detach().mean())
            self.min_sample_margin = float(margins.detach().min())
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

    def _zero_loss_dict(self, embeddings: torch.Tensor) -> dict:
        """An empty batch on every rank: zeros on the graph of the embeddings and of W, so that
        backward() gives zero gradients, as in the single-process losses."""
        zero = embeddings.sum().to(self.W.dtype) * 0 + self.W[:, :0].sum()
        loss = {"losses": zero, "indices": None, "reduction_type": "already_reduced"}
        loss_dict = {"loss": loss}
        if self.sample_margin_regularizer is not None:
            loss_dict["sample_margin_loss"] = dict(loss)
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
