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

Gradients at cos θ = ±1. The angle ``θ = arccos(cos θ)`` has the derivative ``−1/sqrt(1 − cos²θ)``,
infinite where an embedding is exactly parallel or antiparallel to a prototype, and in float32 or
half precision a cosine does round to exactly ±1 (late in training, or for an embedding equal to
its prototype). Through the chain rule that infinity meets zeros (the unused branch of a
``torch.where``, or ``sin θ = 0``) and the gradient becomes NaN, as it does in PML's
``ArcFaceLoss``. The angle is therefore taken by :func:`angles_of`: its forward is
``arccos(clamp(cos θ, −1, 1))``, its backward evaluates the derivative at the cosine clamped to
``[−c*, c*]``, with ``c* = 1 − eps/2`` the largest number below 1 in the cosines' dtype
(``eps = torch.finfo(dtype).eps``). So every cosine strictly inside (−1, 1) keeps its exact
derivative (no representable cosine lies between c* and 1), and a cosine at or beyond ±1 (rounding
can put one an ulp past 1) gets the derivative at ±c*, ``−1/sqrt((1 − c*)(1 + c*)) ≈ −1/sqrt(eps)``:
about −2.9e3 in float32, −6.7e7 in float64, −32 in float16 and −11 in bfloat16. That is the
derivative at the neighbouring representable cosine, so nothing jumps there; and as the cosine's own
gradient with respect to the embedding and the prototype vanishes when they are (anti)parallel, the
loss's gradient stays finite and small. (For a non-integer ``m1`` with ``m2 = 0`` the derivative
at θ = 0 comes out as 0: ``sin(m1·θ) = 0`` times the finite factor, where the limit is ``m1²``;
integer ``m1`` use the Chebyshev form and get ``m1²`` exactly.) Values are unchanged, but for rounding in the ArcFace
fallback: it is written on the cosine itself (``cos θ − m·sin m``, not ``cos(arccos(cos θ))``), so
its derivative is exactly 1, even at θ = π.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from ..validation import check_real

MarginFunction = Callable[[torch.Tensor], torch.Tensor]


class _Arccos(torch.autograd.Function):
    """``arccos(clamp(c, −1, 1))`` with the derivative taken at ``clamp(c, −c*, c*)``."""

    @staticmethod
    def forward(ctx, cosines: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cosines)
        return torch.acos(torch.clamp(cosines, -1.0, 1.0))

    @staticmethod
    def backward(ctx, grad_angles: torch.Tensor) -> torch.Tensor:
        (cosines,) = ctx.saved_tensors
        inside = 1.0 - torch.finfo(cosines.dtype).eps / 2
        clamped = torch.clamp(cosines, -inside, inside)
        return -grad_angles * torch.rsqrt((1.0 - clamped) * (1.0 + clamped))


def angles_of(cosines: torch.Tensor) -> torch.Tensor:
    """``θ = arccos(cos θ)`` with a finite gradient at cos θ = ±1 (see the module docstring)."""
    return _Arccos.apply(cosines)


def additive_cosine_margin(cosines: torch.Tensor, margin: float) -> torch.Tensor:
    """CosFace / AM-Softmax: ``ψ = cos θ − m``."""
    return cosines - margin


def additive_angular_margin(cosines: torch.Tensor, margin: float) -> torch.Tensor:
    """ArcFace: ``cos(θ + m)`` for ``θ ≤ π − m``, PML's fallback ``cos θ − m·sin m`` beyond.

    ``margin`` is in radians (PML's ``ArcFaceLoss`` takes degrees). Evaluated through the angle,
    as PML does, so values and gradients agree with PML to rounding where |cos θ| < 1; at ±1 the
    gradient is finite (module docstring). The fallback is written on the cosine itself.
    """
    angles = angles_of(cosines)
    return torch.where(
        angles <= math.pi - margin,
        torch.cos(angles + margin),
        cosines - margin * math.sin(margin),
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
    ``SphereFaceLoss``, so that the gradient stays finite at θ = 0. Where ``(m·π + a)/π`` is an
    integer, θ = π starts a piece of its own that lies outside [0, π]; ``k`` keeps the last piece
    inside there (same value, ψ being continuous), so the derivative at cos θ = −1 is the limit
    from inside, positive like everywhere else (PML takes the outer piece: the opposite sign).
    """
    angles = angles_of(cosines)
    shifted = multiple * angles + additive_angle
    last_piece = math.ceil((multiple * math.pi + additive_angle) / math.pi) - 1
    with torch.no_grad():
        k = torch.floor(shifted / math.pi).clamp_(max=last_piece)
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


def check_margins(m1: object, m2: object, m3: object) -> tuple[float, float, float]:
    """The combined margin's arguments as floats, each in the range where ψ is defined.

    ``m1`` finite and > 0; ``m2`` in [0, π) radians (at π the target angle would start past π);
    ``m3`` finite. Numpy and 0-d torch scalars are accepted, bools and NaN/inf are not.
    """
    return (
        check_real(m1, "m1 (multiplicative angular margin)", greater_than=0),
        check_real(
            m2,
            "m2 (additive angular margin, radians)",
            at_least=0,
            less_than=math.pi,
            bounds_text="in [0, π)",
        ),
        check_real(m3, "m3 (additive cosine margin)"),
    )


def combined_margin_function(m1: float = 1.0, m2: float = 0.0, m3: float = 0.0) -> MarginFunction:
    """The ψ of :func:`combined_margin` with its margins fixed, checked by :func:`check_margins`."""
    m1, m2, m3 = check_margins(m1, m2, m3)
    return functools.partial(combined_margin, m1=m1, m2=m2, m3=m3)


def target_margin_function(
    m1: float = 1.0, m2: float = 0.0, m3: float = 0.0, psi: MarginFunction | None = None
) -> MarginFunction:
    """GM-Softmax's ψ from a loss's arguments: a custom ``psi``, or the combined margin."""
    if psi is None:
        return combined_margin_function(m1, m2, m3)
    if check_margins(m1, m2, m3) != (1.0, 0.0, 0.0):
        raise ValueError("pass either psi or the margins m1, m2, m3, not both")
    if not callable(psi):
        raise TypeError(f"psi must be callable, got {type(psi).__name__}")
    return psi
