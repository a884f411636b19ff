"""ElasticFace: margins drawn per sample from a normal distribution (Boutros et al., CVPRW 2022)."""

from __future__ import annotations

import math

import torch

from ._angles import additive_angular_margin
from .base_margin_head_loss import BaseMarginHeadLoss
from .base_margin_softmax_loss import DEFAULT_SCALE

# variant -> (default margin, default std), the reference repository's (fdbtrs/ElasticFace).
_VARIANTS = {"arc": (0.5, 0.0125), "cos": (0.35, 0.0125)}


class ElasticFaceLoss(BaseMarginHeadLoss):
    """ElasticFace (docs/theory.md §7.3): ArcFace or CosFace with a random margin per sample.

    In training mode each sample draws ``m_i ~ N(m, σ)`` afresh in every call, and the target logit
    is ``ψ_i(θ) = cos(θ + m_i)`` (``variant="arc"``, ElasticFace-Arc) or ``cos θ − m_i``
    (``variant="cos"``, ElasticFace-Cos); the other logits are ``cos θ_ij``. As in the reference,
    the arc variant has no continuation past ``θ > π − m_i``. In ``eval()`` mode the margin is the
    mean ``m`` (a deterministic validation loss).

    Defaults are the reference repository's (fdbtrs/ElasticFace): arc ``m = 0.5``, cos
    ``m = 0.35``, ``σ = 0.0125`` for both, ``s = 64``. The draws are ``m_i = m + σ·ε_i`` with
    ``ε = torch.randn(N, generator=generator)`` (float32, on the generator's device; the default
    generator when ``generator`` is ``None``), so a seeded ``generator`` reproduces them.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        variant: str = "arc",
        margin: float | None = None,
        std: float | None = None,
        scale: float = DEFAULT_SCALE,
        generator: torch.Generator | None = None,
        **kwargs,
    ):
        super().__init__(num_classes, embedding_size, scale, **kwargs)
        if variant not in _VARIANTS:
            raise ValueError(f"variant must be one of {sorted(_VARIANTS)}, got {variant!r}")
        default_margin, default_std = _VARIANTS[variant]
        margin = default_margin if margin is None else margin
        std = default_std if std is None else std
        if not (math.isfinite(margin) and 0 <= margin < math.pi):
            raise ValueError(f"margin must lie in [0, π), got {margin}")
        if not (math.isfinite(std) and std >= 0):
            raise ValueError(f"std must be a finite number >= 0, got {std}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.variant, self.margin, self.std = variant, float(margin), float(std)
        self.generator = generator
        self.add_to_recordable_attributes(list_of_names=["margin", "std"], is_stat=False)

    def sample_margins(self, like: torch.Tensor) -> torch.Tensor:
        """The margins ``m_i`` of this batch, shaped, typed and placed like ``like``."""
        if not self.training:
            return torch.full_like(like, self.margin)
        device = like.device if self.generator is None else self.generator.device
        noise = torch.randn(like.shape, generator=self.generator, device=device)
        self.broadcast_from_first_rank(noise)
        return self.margin + self.std * noise.to(like)

    def target_logits(
        self, target_cosines: torch.Tensor, norms: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        margins = self.sample_margins(target_cosines)
        if self.variant == "cos":
            return target_cosines - margins
        return additive_angular_margin(target_cosines, margins, fallback=False)
