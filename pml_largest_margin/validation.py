"""Input checks shared by the losses, regularizers and margin functions.

Each check raises ``ValueError`` (or ``TypeError`` for a wrong dtype) with a message that names the
argument, so that bad input fails at the API boundary instead of deep inside torch.
"""

from __future__ import annotations

import torch

_LABEL_DTYPES = (torch.int64, torch.int32)


def check_embeddings(
    embeddings: torch.Tensor, name: str = "embeddings", *, finite: bool = True
) -> None:
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(embeddings).__name__}")
    if embeddings.ndim != 2:
        raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(embeddings.shape)}")
    if not embeddings.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {embeddings.dtype}")
    if finite and embeddings.numel() and not bool(torch.isfinite(embeddings).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def check_labels(
    labels: torch.Tensor, num_classes: int, batch_size: int, name: str = "labels"
) -> None:
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
    if labels.numel():
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"{name} must lie in [0, {num_classes - 1}] for {num_classes} classes, "
                f"got values in [{low}, {high}]"
            )


def check_prototypes(
    weights: torch.Tensor, name: str = "W", *, embedding_size: int | None = None
) -> None:
    """Prototypes in PML's layout: shape (embedding_size, num_classes), one column per class."""
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
    if weights.numel() and not bool(torch.isfinite(weights).all()):
        raise ValueError(f"{name} contains NaN or Inf")
