"""Input checks shared by the losses, regularizers and margin functions.

Each check raises ``ValueError`` (or ``TypeError`` for a wrong type) with a message that names the
argument, so that bad input fails at the API boundary instead of deep inside torch.

Constructor arguments go through :func:`check_integer`, :func:`check_real` and
:func:`check_flag`: Python, numpy and 0-d torch scalars are accepted (``np.float32(16)`` and
``torch.tensor(16.)`` are the number 16), ``bool`` is refused where a number is expected (``True``
is not the scale 1), and NaN or ±inf never passes a range check.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

_LABEL_DTYPES = (torch.int64, torch.int32)

# A vector whose norm is below this is scaled by 1/NORM_EPS instead of 1/norm, as
# torch.nn.functional.normalize does: a zero embedding or prototype has cosine 0 with everything.
# The one rule of the fused kernel, cosine_logits, the sample and class margins.
NORM_EPS = 1e-12


def _scalar(value: object, name: str, kind: type) -> numbers.Number:
    """``value`` as a Python number of abstract type ``kind`` (numbers.Real or numbers.Integral)."""
    if isinstance(value, torch.Tensor):
        if value.ndim != 0:
            raise TypeError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real number, got a {value.dtype} tensor")
        value = value.item()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, kind):
        wanted = "an integer" if kind is numbers.Integral else "a real number"
        raise TypeError(f"{name} must be {wanted}, got {type(value).__name__} {value!r}")
    return value


def check_real(
    value: object,
    name: str,
    *,
    greater_than: float | None = None,
    at_least: float | None = None,
    less_than: float | None = None,
    at_most: float | None = None,
    bounds_text: str | None = None,
) -> float:
    """``value`` as a finite float within the given bounds, else ValueError (TypeError if not a number).

    ``bounds_text`` replaces the bounds in the message (e.g. ``"in [0, π)"``).
    """
    number = float(_scalar(value, name, numbers.Real))
    inside = math.isfinite(number)
    conditions = []
    for bound, symbol, holds in (
        (greater_than, ">", lambda b: number > b),
        (at_least, ">=", lambda b: number >= b),
        (less_than, "<", lambda b: number < b),
        (at_most, "<=", lambda b: number <= b),
    ):
        if bound is not None:
            conditions.append(f"{symbol} {bound:g}")
            inside = inside and holds(bound)
    if not inside:
        text = bounds_text if bounds_text is not None else " and ".join(conditions)
        raise ValueError(
            f"{name} must be a finite number{' ' + text if text else ''}, got {number}"
        )
    return number


def check_integer(value: object, name: str, *, at_least: int | None = None) -> int:
    """``value`` as an int (Python, numpy or 0-d integer tensor; not bool, not float) >= ``at_least``."""
    number = int(_scalar(value, name, numbers.Integral))
    if at_least is not None and number < at_least:
        raise ValueError(f"{name} must be an integer >= {at_least}, got {number}")
    return number


def check_flag(value: object, name: str) -> bool:
    """``value`` as a bool; only ``True``/``False`` (Python or numpy) are accepted."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else ValueError listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_loss_arguments(
    num_classes: object, embedding_size: object, scale: object, *, min_classes: int = 2
) -> tuple[int, int, float]:
    """The size and scale arguments every margin-softmax loss takes, checked and converted.

    ``num_classes`` an integer >= ``min_classes``, ``embedding_size`` an integer >= 1, ``scale`` a
    finite number > 0.
    """
    return (
        check_integer(num_classes, "num_classes", at_least=min_classes),
        check_integer(embedding_size, "embedding_size", at_least=1),
        check_real(scale, "scale", greater_than=0),
    )


def check_embeddings(
    embeddings: torch.Tensor, name: str = "embeddings", *, finite: bool = True
) -> None:
    """A 2-D floating-point tensor (batch, dim), free of NaN/Inf when ``finite``."""
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(embeddings).__name__}")
    if embeddings.ndim != 2:
        raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(embeddings.shape)}")
    if not embeddings.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {embeddings.dtype}")
    if finite and embeddings.numel() and not bool(torch.isfinite(embeddings).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def check_labels(
    labels: torch.Tensor, num_classes: int | None, batch_size: int, name: str = "labels"
) -> None:
    """Integer class labels (N,) in ``[0, num_classes)``; ``num_classes=None`` skips the range."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in _LABEL_DTYPES:
        raise TypeError(f"{name} must be int64 or int32, got {labels.dtype}")
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    if labels.shape[0] != batch_size:
        raise ValueError(
            f"{name} has {labels.shape[0]} entries but there are {batch_size} embeddings"
        )
    if num_classes is not None and labels.numel():
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"{name} must lie in [0, {num_classes - 1}] for {num_classes} classes, "
                f"got values in [{low}, {high}]"
            )


def check_prototypes(
    weights: torch.Tensor,
    name: str = "W",
    *,
    embedding_size: int | None = None,
    finite: bool = True,
) -> None:
    """Prototypes in PML's layout: shape (embedding_size, num_classes), one column per class,
    free of NaN/Inf when ``finite``."""
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weights).__name__}")
    if weights.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D in PML's layout (embedding_size, num_classes), "
            f"got shape {tuple(weights.shape)}"
        )
    if not weights.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {weights.dtype}")
    if embedding_size is not None and weights.shape[0] != embedding_size:
        raise ValueError(
            f"{name} has {weights.shape[0]} rows but the embeddings have dimension {embedding_size}; "
            "prototypes use PML's layout (embedding_size, num_classes)"
        )
    if finite and weights.numel() and not bool(torch.isfinite(weights).all()):
        raise ValueError(f"{name} contains NaN or Inf")
