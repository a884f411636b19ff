"""The losses ``pml-lm train`` and ``pml-lm demo`` know by name: their scale and margin, with units.

One entry a loss; :mod:`.loss_factory` builds them and the command line takes its choices, help
and checks from here. Imports nothing heavy (the parsers are built without torch).

Units: an angular margin is in radians (ArcFace is this package's GM-Softmax arcface preset,
whose m2 is in radians), a cosine margin is subtracted from the target cosine, SphereFace's margin is
the integer angle multiplier m of cos(mθ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "LOSSES",
    "LOSS_NAMES",
    "LossSpec",
    "MarginSpec",
    "check_loss_options",
    "check_sub_centers",
]


@dataclass(frozen=True)
class MarginSpec:
    """A loss's margin: its default, unit and valid range ``[low, high)`` (``]`` if inclusive)."""

    default: float
    unit: str
    low: float
    high: float
    high_inclusive: bool = False
    integer: bool = False

    def describe_range(self) -> str:
        """E.g. ``[0, π) (radians)``."""
        closing = "]" if self.high_inclusive else ")"
        return f"[{self.low:g}, {_format_bound(self.high)}{closing} ({self.unit})"

    def contains(self, value: float) -> bool:
        if not math.isfinite(value) or value < self.low:
            return False
        if self.integer and value != int(value):
            return False
        return value <= self.high if self.high_inclusive else value < self.high


def _format_bound(value: float) -> str:
    if value == math.pi:
        return "π"
    if value == math.pi / 2:
        return "π/2"
    return f"{value:g}"


@dataclass(frozen=True)
class LossSpec:
    """``takes_scale``: the loss has a scale ``s``; its default is the recipe's ``s`` unless
    ``default_scale`` is set. ``margin``: None for a loss without a margin option.
    ``takes_sub_centers``: the loss has k prototypes per class on request (``--sub-centers``)."""

    name: str
    description: str
    takes_scale: bool = True
    default_scale: float | None = None
    margin: MarginSpec | None = None
    takes_sub_centers: bool = False


_RADIANS = "radians"
_COSINE = "cosine"
# CosFace subtracts m from a cosine: beyond 2 no sample can satisfy the margin.
_COSINE_MARGIN = MarginSpec(0.35, _COSINE, 0.0, 2.0)
# An angle added to θ: beyond π it wraps round (the library's heads refuse it too).
_HALF_TURN = {"unit": _RADIANS, "low": 0.0, "high": math.pi}

LOSSES: tuple[LossSpec, ...] = (
    LossSpec("softmax", "cross-entropy on z @ W, nothing normalised", takes_scale=False),
    LossSpec("normface", "PML's NormalizedSoftmaxLoss, temperature 1/s"),
    LossSpec("cosface", "PML's CosFaceLoss, cos θ − m", margin=_COSINE_MARGIN),
    LossSpec(
        "arcface",
        "GeneralizedMarginSoftmaxLoss's arcface preset, cos(θ + m) (PML's ArcFaceLoss's formula)",
        margin=MarginSpec(0.5, **_HALF_TURN),
        takes_sub_centers=True,
    ),
    LossSpec(
        "sphereface",
        "PML's SphereFaceLoss, ‖x‖·s·ψ(θ) with cos(mθ); s defaults to PML's 1",
        default_scale=1.0,
        # PML truncates a fractional m; its float32 multiple-angle expansion is within 3e-5 of
        # cos(mθ) up to m = 20 and overflows for m in the hundreds.
        margin=MarginSpec(4, "integer m of cos(mθ)", 1, 20, high_inclusive=True, integer=True),
    ),
    LossSpec("lm-softmax", "LargestMarginSoftmaxLoss (this package)", takes_sub_centers=True),
    LossSpec("adaface", "AdaFaceLoss", margin=MarginSpec(0.4, _RADIANS, 0.0, math.pi / 2)),
    LossSpec("magface", "MagFaceLoss (margins from the feature norm)"),
    LossSpec("curricularface", "CurricularFaceLoss", margin=MarginSpec(0.5, **_HALF_TURN)),
    LossSpec("elasticface-arc", "ElasticFaceLoss, angular", margin=MarginSpec(0.5, **_HALF_TURN)),
    LossSpec("elasticface-cos", "ElasticFaceLoss, cosine", margin=_COSINE_MARGIN),
    LossSpec("adacos", "AdaCosLoss, adaptive scale", takes_scale=False),
    LossSpec("adacos-fixed", "AdaCosLoss, fixed scale √2·log(C − 1)", takes_scale=False),
    LossSpec("dynamic-margin", "DynamicMarginLoss (margins from the class counts)"),
)
LOSS_NAMES: tuple[str, ...] = tuple(spec.name for spec in LOSSES)
_BY_NAME = {spec.name: spec for spec in LOSSES}


def loss_spec(name: str) -> LossSpec:
    """The entry of ``name``. Raises ValueError for an unknown name, listing the known ones."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
    return _BY_NAME[name]


def check_loss_options(name: str, scale: float | None, margin: float | None) -> None:
    """Refuse a scale or margin that ``name`` does not have, or a margin out of its range.

    Raises:
        ValueError: unknown loss; ``scale`` given to a loss without one or not > 0; ``margin``
            given to a loss without one or outside :meth:`MarginSpec.describe_range`.
    """
    spec = loss_spec(name)
    if scale is not None:
        if not spec.takes_scale:
            with_scale = [s.name for s in LOSSES if s.takes_scale]
            raise ValueError(
                f"loss {name!r} has no scale option; --scale applies to {', '.join(with_scale)}"
            )
        if not scale > 0:  # NaN fails too
            raise ValueError(f"scale must be positive, got {scale}")
    if margin is not None:
        if spec.margin is None:
            with_margin = [s.name for s in LOSSES if s.margin is not None]
            raise ValueError(
                f"loss {name!r} has no margin option; --margin applies to {', '.join(with_margin)}"
            )
        if not spec.margin.contains(margin):
            kind = "an integer" if spec.margin.integer else "a number"
            raise ValueError(
                f"margin {margin:g} is out of range for loss {name!r}: "
                f"it takes {kind} in {spec.margin.describe_range()}"
            )


def check_sub_centers(name: str, sub_centers: int) -> None:
    """Refuse a sub-centre count below 1, or above 1 for a loss without sub-centres.

    Raises:
        ValueError: unknown loss; ``sub_centers`` not an integer >= 1, or > 1 for a loss whose
            entry has no ``takes_sub_centers``.
    """
    spec = loss_spec(name)
    if isinstance(sub_centers, bool) or int(sub_centers) != sub_centers or sub_centers < 1:
        raise ValueError(f"sub-centers must be an integer >= 1, got {sub_centers}")
    if sub_centers > 1 and not spec.takes_sub_centers:
        with_sub_centers = [s.name for s in LOSSES if s.takes_sub_centers]
        raise ValueError(
            f"loss {name!r} has no sub-centres; --sub-centers applies to "
            f"{', '.join(with_sub_centers)}"
        )
