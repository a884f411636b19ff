"""Target-class margin functions ψ of GM-Softmax, written on cosine tensors (docs/theory.md §3).

Each function maps the cosine ``cos θ`` of a sample to its target class onto the target logit
``ψ(θ)`` before scaling; all are elementwise and differentiable, so the same code serves the
fused losses, the autograd reference path and the later class-parallel losses.

The combined margin follows insightface's convention ``ψ(θ) = cos(m1·θ + m2) − m3``:
``m1`` multiplicative angular (SphereFace), ``m2`` additive angular in radians (ArcFace),
``m3`` additive cosine (CosFace). Where ``m1·θ + m2`` would pass π the cosine turns back up, so
each form has a continuation that keeps ψ decreasing in θ:

- ``m1 == 1`` (ArcFace and CosFace): beyond ``θ > π − m2``, PML's ``ArcFaceLoss`` fallback
  ``cos θ − m2·sin(m2)``, so that the preset agrees with PML.
- otherwise (SphereFace): the A-Softmax piecewise form ``(−1)^k cos(m1·θ + m2) − 2k`` with
  ``k = floor((m1·θ + m2)/π)``, which for ``m2 = 0`` and an integer ``m1`` is exactly SphereFace's
  ``ψ`` (and PML's ``SphereFaceLoss``'s).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

MarginFunction = Callable[[torch.Tensor], torch.Tensor]


def _angles(cosines: torch.Tensor) -> torch.Tensor:
    return torch.acos(torch.clamp(cosines, -1.0, 1.0))


def additive_cosine_margin(cosines: torch.Tensor, margin: float) -> torch.Tensor:
    """CosFace / AM-Softmax: ``ψ = cos θ − m``."""
    return cosines - margin


def additive_angular_margin(cosines: torch.Tensor, margin: float) -> torch.Tensor:
    """ArcFace: ``cos(θ + m)`` for ``θ ≤ π − m``, PML's fallback ``cos θ − m·sin m`` beyond.

    ``margin`` is in radians (PML's ``ArcFaceLoss`` takes degrees). Evaluated through the angle,
    as PML does, so values and gradients agree with PML to rounding.
    """
    angles = _angles(cosines)
    return torch.where(
        angles <= math.pi - margin,
        torch.cos(angles + margin),
        torch.cos(angles) - margin * math.sin(margin),
    )


def chebyshev_cosine_multiple(cosines: torch.Tensor, multiple: int) -> torch.Tensor:
    """``cos(m·θ)`` as the Chebyshev polynomial ``T_m(cos θ)``: a finite gradient even at θ = 0."""
    previous, current = torch.ones_like(cosines), cosines
    if multiple == 0:
        return previous
    for _ in range(multiple - 1):
        previous, current = current, 2 * cosines * current - previous
    return current


def multiplicative_angular_margin(
    cosines: torch.Tensor, multiple: float, additive_angle: float = 0.0
) -> torch.Tensor:
    """SphereFace: ``(−1)^k cos(m·θ + a) − 2k`` with ``k = floor((m·θ + a)/π)``.

    ``k`` is a piecewise constant (no gradient). For an integer ``m`` and ``a = 0`` the cosine of
    the multiple angle is evaluated as a Chebyshev polynomial of ``cos θ``, like PML's
    ``SphereFaceLoss``, so that the gradient stays finite at θ = 0.
    """
    angles = _angles(cosines)
    shifted = multiple * angles + additive_angle
    with torch.no_grad():
        k = torch.floor(shifted / math.pi)
    if additive_angle == 0.0 and float(multiple).is_integer():
        cos_multiple = chebyshev_cosine_multiple(cosines, int(multiple))
    else:
        cos_multiple = torch.cos(shifted)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    return sign * cos_multiple - 2.0 * k


def combined_margin(
    cosines: torch.Tensor, m1: float = 1.0, m2: float = 0.0, m3: float = 0.0
) -> torch.Tensor:
    """``ψ(θ) = cos(m1·θ + m2) − m3`` with the continuations described in the module docstring."""
    if m1 == 1.0:
        target = cosines if m2 == 0.0 else additive_angular_margin(cosines, m2)
    else:
        target = multiplicative_angular_margin(cosines, m1, m2)
    return additive_cosine_margin(target, m3) if m3 != 0.0 else target


def combined_margin_function(m1: float = 1.0, m2: float = 0.0, m3: float = 0.0) -> MarginFunction:
    """The ψ of :func:`combined_margin` with its margins fixed, checked for sense."""
    if not m1 > 0:
        raise ValueError(f"m1 (multiplicative angular margin) must be > 0, got {m1}")
    if not 0 <= m2 < math.pi:
        raise ValueError(f"m2 (additive angular margin, radians) must lie in [0, π), got {m2}")
    if not math.isfinite(m3):
        raise ValueError(f"m3 (additive cosine margin) must be finite, got {m3}")
    return functools.partial(combined_margin, m1=float(m1), m2=float(m2), m3=float(m3))


def target_margin_function(
    m1: float = 1.0, m2: float = 0.0, m3: float = 0.0, psi: MarginFunction | None = None
) -> MarginFunction:
    """GM-Softmax's ψ from a loss's arguments: a custom ``psi``, or the combined margin."""
    if psi is None:
        return combined_margin_function(m1, m2, m3)
    if (m1, m2, m3) != (1.0, 0.0, 0.0):
        raise ValueError("pass either psi or the margins m1, m2, m3, not both")
    if not callable(psi):
        raise TypeError(f"psi must be callable, got {type(psi).__name__}")
    return psi
