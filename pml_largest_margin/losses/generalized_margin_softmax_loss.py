"""GM-Softmax, the generalized margin softmax family (NormFace, SphereFace, CosFace, ArcFace)."""

from __future__ import annotations

import torch

from ..margins import cosine_logits, max_over_sub_centers, sample_margins_from_cosines
from .base_margin_softmax_loss import DEFAULT_SCALE, BaseMarginSoftmaxLoss
from .functional import generalized_margin_softmax, generalized_margin_softmax_head
from .margin_functions import MarginFunction, check_margins, target_margin_function
from .margin_presets_mixin import MarginPresetsMixin


class GeneralizedMarginSoftmaxLoss(MarginPresetsMixin, BaseMarginSoftmaxLoss):
    """GM-Softmax: ``L_i = −log(e^{s·ψ(θ_iy)} / (e^{s·ψ(θ_iy)} + Σ_{j≠y} e^{s·φ(θ_ij)}))``.

    By default ``ψ(θ) = cos(m1·θ + m2) − m3`` (insightface's combined margin: ``m1``
    multiplicative angular, ``m2`` additive angular in radians, ``m3`` additive cosine; see
    :mod:`pml_largest_margin.losses.margin_functions` for the continuation past ``π``: PML's
    ``ArcFaceLoss`` fallback when ``m1 = 1`` and ``m2 > 0``, SphereFace's piecewise form when
    ``m1 ≠ 1``) and ``φ(θ) = cos θ``.

    Presets (``GeneralizedMarginSoftmaxLoss.preset(name, num_classes, embedding_size, ...)``):

    ========== ============================ ============ ===========================================
    name       ψ(θ)                          default s    agrees with (same W and inputs)
    ========== ============================ ============ ===========================================
    normface   cos θ                        20           ``NormalizedSoftmaxLoss(temperature=1/s)``
    sphereface (−1)^k cos(mθ) − 2k, m=4     64           ``SphereFaceLoss(margin=m, scale=s)`` on
                                                         unit-norm embeddings (PML scales by ‖x‖)
    cosface    cos θ − m, m=0.35            64           ``CosFaceLoss(margin=m, scale=s)``
    arcface    cos(θ + m), m=0.5 rad        64           ``ArcFaceLoss(margin=degrees(m), scale=s)``
    ========== ============================ ============ ===========================================

    "Agrees" is tested to 1e-10 in float64 (loss and gradients). In float32 both this loss and PML's
    are within a bound derived from the inputs' conditioning of their float64 value, which for
    SphereFace m=4 and ArcFace with m near π/2 on embeddings close to their prototypes is 1e-5–1e-4
    on the gradients, not 1e-5 (docs/losses.md, *Precision*). Gradients stay finite at cos θ = ±1
    (:mod:`~pml_largest_margin.losses.margin_functions`); a zero prototype column has cosine 0.

    Args:
        psi, phi: your own target and non-target functions of the cosine (elementwise, tensors
            in and out). ``psi`` replaces m1, m2, m3 (pass one or the other); it may be an
            ``nn.Module`` with parameters. ``phi=None`` is ``cos θ`` and runs the fused kernel
            (:mod:`pml_largest_margin.losses.fused`); a custom ``phi`` goes through autograd
            on the full batch × classes matrix (so ``memory="stream"`` is refused with it).
        sub_centers: k prototypes per class (W of shape (d, C·k), a class's cosine the best of
            its k), as in PML's ``SubCenterArcFaceLoss``, which the arcface preset with
            ``sub_centers=k`` equals; see :class:`BaseMarginSoftmaxLoss`.
        validate_inputs, **kwargs: as for :class:`LargestMarginSoftmaxLoss` (the note on
            ``DistributedLossWrapper`` there applies here too).
    """

    supports_sub_centers = True

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        scale: float = DEFAULT_SCALE,
        m1: float = 1.0,
        m2: float = 0.0,
        m3: float = 0.0,
        psi: MarginFunction | None = None,
        phi: MarginFunction | None = None,
        **kwargs,
    ):
        super().__init__(num_classes, embedding_size, scale, **kwargs)
        self.psi = target_margin_function(m1, m2, m3, psi)
        if phi is not None and not callable(phi):
            raise TypeError(f"phi must be callable, got {type(phi).__name__}")
        if phi is not None and self.memory == "stream":
            raise ValueError(
                "memory='stream' needs the default phi: a custom phi runs through autograd on "
                "the batch × classes cosine matrix"
            )
        self.m1, self.m2, self.m3 = check_margins(m1, m2, m3)
        self.phi = phi
        self.add_to_recordable_attributes(list_of_names=["m1", "m2", "m3"], is_stat=False)

    def per_sample_losses(
        self,
        embeddings: torch.Tensor,
        weights: torch.Tensor,
        labels: torch.Tensor,
        with_margins: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.phi is None:
            nontarget_lse, target, margins = self.cosine_statistics(
                embeddings, weights, labels, self.scale, with_margins
            )
            losses = generalized_margin_softmax_head(nontarget_lse, self.psi(target), self.scale)
            return losses, margins
        cosines = max_over_sub_centers(cosine_logits(embeddings, weights), self.sub_centers)
        margins = None
        if with_margins:
            given = cosines if self.margins_need_gradient else cosines.detach()
            margins = sample_margins_from_cosines(given, labels)
        return generalized_margin_softmax(cosines, labels, self.scale, self.psi, self.phi), margins
