"""Angles and per-sample angular margins of the margin heads, with finite gradients at cos = ±1.

``d arccos(c)/dc = −1/sin θ`` is infinite at ``c = ±1``, where the cosine's own gradient with
respect to the embeddings vanishes (the embedding is parallel to the prototype), so autograd
through ``torch.acos`` (or through ``sqrt(1 − c²)``, as the reference heads write ArcFace) gives
``0 · ∞ = NaN`` there. :func:`arccos` has the exact value everywhere in ``[−1, 1]`` and the exact
derivative wherever ``sin θ ≥ 1e-6``; below that the derivative is capped, which keeps every
gradient finite without changing any value.
"""

from __future__ import annotations

import math

import torch

_MIN_SINE = 1e-6


class _ArcCos(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cosines):
        clamped = cosines.clamp(-1.0, 1.0)
        ctx.save_for_backward(clamped)
        return torch.acos(clamped)

    @staticmethod
    def backward(ctx, grad_angles):
        (clamped,) = ctx.saved_tensors
        # (1 − c)(1 + c) keeps the digits that 1 − c² loses near ±1.
        sines = ((1 - clamped) * (1 + clamped)).clamp_min_(_MIN_SINE**2).sqrt_()
        return -grad_angles / sines


def arccos(cosines: torch.Tensor) -> torch.Tensor:
    """``arccos(clamp(c, −1, 1))`` with the derivative capped at ``|1/sin θ| ≤ 1e6``."""
    return _ArcCos.apply(cosines)


def additive_angular_margin(
    cosines: torch.Tensor, margins: torch.Tensor | float, *, fallback: bool = True
) -> torch.Tensor:
    """ArcFace's ``cos(θ + m_i)`` with a margin per sample (a tensor broadcast to ``cosines``).

    With ``fallback`` (insightface's rule, used by MagFace and the dynamic-margin ArcFace), the
    target logit is ``cos θ − m_i·sin m_i`` where ``θ > π − m_i``, which keeps it decreasing in θ;
    without it (ElasticFace's reference), ``cos(θ + m_i)`` everywhere.
    """
    angles = arccos(cosines)
    shifted = torch.cos(angles + margins)
    if not fallback:
        return shifted
    margins = torch.as_tensor(margins, dtype=cosines.dtype, device=cosines.device)
    return torch.where(angles <= math.pi - margins, shifted, cosines - margins * torch.sin(margins))
