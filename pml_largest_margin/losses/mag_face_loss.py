"""MagFace: a margin that grows with the feature magnitude, plus a magnitude regulariser (Meng et al., CVPR 2021)."""

from __future__ import annotations

import math

import torch

from ._angles import additive_angular_margin
from .base_margin_head_loss import BaseMarginHeadLoss
from .base_margin_softmax_loss import DEFAULT_SCALE


class MagFaceLoss(BaseMarginHeadLoss):
    """MagFace (docs/theory.md §7.2): ArcFace with a magnitude-dependent margin and ``λ_g·g(a)``.

    With the magnitude ``a_i = clip(‖z_i‖, l_a, u_a)`` (differentiable inside the range) and the
    margin ``m(a) = l_m + (u_m − l_m)·(a − l_a)/(u_a − l_a)``, linear from ``l_m`` to ``u_m``,

        L_i = CE_i(ψ_i) + λ_g·g(a_i),   ψ_i(θ) = cos(θ + m(a_i)),   g(a) = a/u_a² + 1/a,

    with ArcFace's continuation ``cos θ − m·sin m`` beyond ``θ > π − m(a_i)`` (the reference's
    non-easy margin) and plain cosines for the other classes. ``g`` is convex and decreasing
    on ``[l_a, u_a]`` (its minimum is at ``u_a``), so the regulariser pushes magnitudes up while
    the margin pulls easy samples to larger ones. Defaults are the MagFace repository's
    (IrvingMeng/MagFace): ``l_a = 10``, ``u_a = 110``, ``l_m = 0.45``, ``u_m = 0.8``, ``s = 64``,
    ``λ_g = 35`` (its training script's default; FaceX-Zoo's MagFace head uses ``λ = 20`` with
    ``s = 32``). The reference averages ``g`` over the batch and adds it to the mean
    cross-entropy; here it joins each sample's loss, which is the same under PML's default
    ``MeanReducer`` and weights it like the loss under a miner.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        scale: float = DEFAULT_SCALE,
        lower_norm: float = 10.0,
        upper_norm: float = 110.0,
        lower_margin: float = 0.45,
        upper_margin: float = 0.8,
        lambda_g: float = 35.0,
        **kwargs,
    ):
        super().__init__(num_classes, embedding_size, scale, **kwargs)
        if not (math.isfinite(upper_norm) and 0 < lower_norm < upper_norm):
            raise ValueError(
                f"need 0 < lower_norm < upper_norm < inf, got {lower_norm}, {upper_norm}"
            )
        if not 0 <= lower_margin <= upper_margin < math.pi:
            raise ValueError(
                f"need 0 <= lower_margin <= upper_margin < π, got {lower_margin}, {upper_margin}"
            )
        if not (math.isfinite(lambda_g) and lambda_g >= 0):
            raise ValueError(f"lambda_g must be a finite number >= 0, got {lambda_g}")
        self.lower_norm, self.upper_norm = float(lower_norm), float(upper_norm)
        self.lower_margin, self.upper_margin = float(lower_margin), float(upper_margin)
        self.lambda_g = float(lambda_g)
        self.add_to_recordable_attributes(
            list_of_names=["lower_norm", "upper_norm", "lower_margin", "upper_margin", "lambda_g"],
            is_stat=False,
        )

    def magnitudes(self, norms: torch.Tensor) -> torch.Tensor:
        """``a_i = clip(‖z_i‖, l_a, u_a)``."""
        return norms.clamp(self.lower_norm, self.upper_norm)

    def margins(self, norms: torch.Tensor) -> torch.Tensor:
        """``m(a_i)``, linear in the clipped magnitude."""
        slope = (self.upper_margin - self.lower_margin) / (self.upper_norm - self.lower_norm)
        return self.lower_margin + slope * (self.magnitudes(norms) - self.lower_norm)

    def target_logits(
        self, target_cosines: torch.Tensor, norms: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        return additive_angular_margin(target_cosines, self.margins(norms).to(target_cosines))

    def norm_penalties(self, norms: torch.Tensor) -> torch.Tensor:
        magnitudes = self.magnitudes(norms)
        return self.lambda_g * (magnitudes / self.upper_norm**2 + 1 / magnitudes)
