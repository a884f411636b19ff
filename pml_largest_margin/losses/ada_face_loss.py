"""AdaFace: a margin that adapts to the feature norm as a proxy of image quality (Kim et al., CVPR 2022)."""

from __future__ import annotations

import math

import torch

from ._angles import arccos
from .base_margin_head_loss import BaseMarginHeadLoss
from .base_margin_softmax_loss import DEFAULT_SCALE

# Norms are clipped to [0.001, 100] before the statistics, as in the reference.
_NORM_RANGE = (1e-3, 100.0)


class AdaFaceLoss(BaseMarginHeadLoss):
    """AdaFace (docs/theory.md §7.1): the margin moves between ArcFace and CosFace with the norm.

    With ``a_i = clip(‖z_i‖, 0.001, 100)`` (no gradient), the norm statistics ``μ, σ`` (mean and
    unbiased standard deviation of the batch's ``a``, blended into the running buffers
    ``μ ← α·μ_batch + (1 − α)·μ``, likewise σ, ``α = t_alpha``), and
    ``g_i = clip(h·(a_i − μ)/(σ + ε), −1, 1)``, the target logit is

        ψ_i(θ) = cos(clip(θ − m·g_i, ε, π − ε)) − (m + m·g_i),   θ = arccos(clip(cos θ, −1+ε, 1−ε))

    and the non-target logits are ``cos θ_ij``: a high-norm (good-quality) sample gets an angular
    margin up to ``m`` and no additive one, a low-norm sample an additive margin up to ``2m``
    and a negative angular one. Defaults are the reference repository's (mk-minchul/AdaFace):
    ``m = 0.4``, ``h = 0.333``, ``s = 64``, ``t_alpha = 1.0`` (the batch's own statistics),
    ``ε = 1e-3``, running statistics initialised to ``μ = 20``, ``σ = 100``.

    One departure: the reference also clips the non-target cosines to ``[−1+ε, 1−ε]``; here they
    stay plain cosines (the fused kernel's ``u``), which differs only for non-target classes with
    ``|cos θ_ij| > 0.999``.

    The statistics are updated in training mode (first, then used, as in the reference) and frozen
    in ``eval()``, where the stored ``running_norm_mean`` / ``running_norm_std`` are used. They
    need at least two samples in the (global) batch. ``process_group`` all-reduces them exactly
    (the statistics of the concatenated batch of all ranks); see :class:`BaseMarginHeadLoss`.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.4,
        h: float = 0.333,
        scale: float = DEFAULT_SCALE,
        t_alpha: float = 1.0,
        eps: float = 1e-3,
        **kwargs,
    ):
        super().__init__(num_classes, embedding_size, scale, **kwargs)
        if not (math.isfinite(margin) and 0 <= margin < math.pi / 2):
            raise ValueError(f"margin must lie in [0, π/2), got {margin}")
        if not (math.isfinite(h) and h >= 0):
            raise ValueError(f"h must be a finite number >= 0, got {h}")
        if not 0 < t_alpha <= 1:
            raise ValueError(f"t_alpha must lie in (0, 1], got {t_alpha}")
        if not 0 < eps < 0.5:
            raise ValueError(f"eps must lie in (0, 0.5), got {eps}")
        self.margin, self.h, self.t_alpha, self.eps = (
            float(margin),
            float(h),
            float(t_alpha),
            float(eps),
        )
        self.register_buffer("running_norm_mean", torch.tensor(20.0, dtype=torch.float64))
        self.register_buffer("running_norm_std", torch.tensor(100.0, dtype=torch.float64))
        self.add_to_recordable_attributes(
            list_of_names=["margin", "h", "t_alpha", "eps"], is_stat=False
        )

    @torch.no_grad()
    def update_norm_statistics(self, norms: torch.Tensor) -> None:
        """Blend the batch's (all ranks') norm mean and unbiased std into the running buffers."""
        clipped = norms.detach().double().clamp(*_NORM_RANGE)
        count_and_sum = self.reduce_over_ranks(
            torch.stack([clipped.new_tensor(len(clipped)), clipped.sum()])
        )
        count = int(count_and_sum[0])
        if count < 2:
            raise ValueError(
                "AdaFace needs at least 2 samples per batch in training mode to estimate the "
                f"standard deviation of the feature norms, got {count}"
            )
        mean = count_and_sum[1] / count
        squares = self.reduce_over_ranks((clipped - mean).square().sum())
        std = (squares / (count - 1)).sqrt()
        alpha = self.t_alpha
        self.running_norm_mean.mul_(1 - alpha).add_(alpha * mean.to(self.running_norm_mean))
        self.running_norm_std.mul_(1 - alpha).add_(alpha * std.to(self.running_norm_std))

    def margin_scalers(self, norms: torch.Tensor) -> torch.Tensor:
        """``g_i = clip(h·(a_i − μ)/(σ + ε), −1, 1)`` with the current running μ, σ (no gradient)."""
        clipped = norms.detach().clamp(*_NORM_RANGE)
        mean = self.running_norm_mean.to(clipped)
        std = self.running_norm_std.to(clipped)
        return (self.h * (clipped - mean) / (std + self.eps)).clamp(-1.0, 1.0)

    def target_logits(
        self, target_cosines: torch.Tensor, norms: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        if self.training:
            self.update_norm_statistics(norms)
        scalers = self.margin_scalers(norms).to(target_cosines)
        eps = self.eps
        angles = arccos(target_cosines.clamp(-1 + eps, 1 - eps))
        shifted = (angles - self.margin * scalers).clamp(eps, math.pi - eps)
        return torch.cos(shifted) - (self.margin + self.margin * scalers)
