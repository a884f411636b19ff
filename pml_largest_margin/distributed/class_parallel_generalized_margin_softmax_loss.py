from __future__ import annotations

import torch

from ..losses.base_margin_softmax_loss import DEFAULT_SCALE
from ..losses.functional import generalized_margin_softmax_head
from ..losses.margin_functions import MarginFunction, check_margins, target_margin_function
from ..losses.margin_presets_mixin import MarginPresetsMixin
from ._sharded_cosine_statistics import ShardedCosineStatistics
from .class_parallel_loss_base import ClassParallelLossBase


class ClassParallelGeneralizedMarginSoftmaxLoss(MarginPresetsMixin, ClassParallelLossBase):
    """GM-Softmax with its prototypes split over the ranks of a process group.

    ``L_i = log(1 + Σ_{j≠y_i} e^{s·cos θ_ij} / e^{s·ψ(θ_{i,y_i})})``, exactly as the single-process
    ``GeneralizedMarginSoftmaxLoss`` on the concatenated batch with the full W: the same
    ``ψ(θ) = cos(m1·θ + m2) − m3`` (or a custom ``psi``), the same presets
    (``ClassParallelGeneralizedMarginSoftmaxLoss.preset("arcface", num_classes, embedding_size,
    ...)``). ψ only touches the target cosine, which comes from the rank owning the class, so it
    runs on an (N,) vector after the exact sharded statistics. The non-target function is always
    ``cos θ`` (no ``phi``). See ``ClassParallelLossBase`` for the sharding, gradient and sampling
    conventions; a ``psi`` with parameters gets the same, full gradient on every rank.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        scale: float = DEFAULT_SCALE,
        m1: float = 1.0,
        m2: float = 0.0,
        m3: float = 0.0,
        psi: MarginFunction | None = None,
        **kwargs,
    ):
        super().__init__(num_classes, embedding_size, scale, **kwargs)
        self.psi = target_margin_function(m1, m2, m3, psi)
        self.m1, self.m2, self.m3 = check_margins(m1, m2, m3)
        self.add_to_recordable_attributes(list_of_names=["m1", "m2", "m3"], is_stat=False)

    def settings_that_must_agree(self) -> dict[str, object]:
        # m1, m2, m3 are recorded attributes; a custom psi is compared by its name (a preset's
        # functools.partial by its function's).
        function = getattr(self.psi, "func", self.psi)
        psi_name = getattr(function, "__qualname__", type(function).__qualname__)
        return {**super().settings_that_must_agree(), "psi": psi_name}

    def losses_from_statistics(self, statistics: ShardedCosineStatistics) -> torch.Tensor:
        return generalized_margin_softmax_head(
            statistics.non_target_logsumexp, self.psi(statistics.target_cosine), self.scale
        )
