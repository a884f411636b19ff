"""Embedding networks for images: a small built-in CNN, or torchvision's (extra ``torchvision``)."""

from __future__ import annotations

import torch

BUILTIN_BACKBONE = "small-cnn"


class SmallCNN(torch.nn.Module):
    """Three conv-BN-ReLU stages (32, 64, 128 channels), global average pooling, a linear layer.

    A CPU-friendly default that needs nothing beyond torch; any input size of at least 8 × 8.
    """

    def __init__(self, embedding_size: int):
        super().__init__()
        layers, channels = [], 3
        for width in (32, 64, 128):
            layers += [
                torch.nn.Conv2d(channels, width, 3, padding=1, bias=False),
                torch.nn.BatchNorm2d(width),
                torch.nn.ReLU(inplace=True),
                torch.nn.MaxPool2d(2),
            ]
            channels = width
        self.features = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1))
        self.embedding = torch.nn.Linear(channels, embedding_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.features(images).flatten(1))


def _torchvision_backbone(name: str, embedding_size: int, pretrained: bool) -> torch.nn.Module:
    try:
        from torchvision import models
    except ImportError as error:
        raise ValueError(
            f'backbone {name!r} needs torchvision: python3 -m pip install -e ".[torchvision]" '
            f"(or use --backbone {BUILTIN_BACKBONE})"
        ) from error
    # A torchvision built for another torch build raises when it registers its operators.
    except Exception as error:
        from ..cli.environment import installed_version

        version = installed_version(("torchvision",)) or "(version unknown)"
        raise ValueError(
            f"backbone {name!r}: torchvision {version} does not load "
            f"beside torch {torch.__version__} ({type(error).__name__}: {error}); install the "
            f"torchvision built for this torch, from the same package index (or use --backbone "
            f"{BUILTIN_BACKBONE})"
        ) from error
    if name not in models.list_models(module=models):
        raise ValueError(f"torchvision has no classification model {name!r}")
    network = models.get_model(name, weights="DEFAULT" if pretrained else None)
    # The classifier head becomes the embedding layer.
    for attribute in ("fc", "classifier", "head", "heads"):
        head = getattr(network, attribute, None)
        if head is None:
            continue
        last = head[-1] if isinstance(head, torch.nn.Sequential) else head
        if isinstance(last, torch.nn.Linear):
            replacement = torch.nn.Linear(last.in_features, embedding_size)
            if isinstance(head, torch.nn.Sequential):
                head[-1] = replacement
            else:
                setattr(network, attribute, replacement)
            return network
    raise ValueError(f"cannot find the linear classifier head of torchvision model {name!r}")


def build_backbone(name: str, embedding_size: int, pretrained: bool = False) -> torch.nn.Module:
    """``small-cnn`` (built in) or a torchvision classification model name such as ``resnet18``."""
    if embedding_size < 1:
        raise ValueError(f"embedding size must be at least 1, got {embedding_size}")
    if name == BUILTIN_BACKBONE:
        if pretrained:
            raise ValueError(f"{BUILTIN_BACKBONE} has no pretrained weights")
        return SmallCNN(embedding_size)
    return _torchvision_backbone(name, embedding_size, pretrained)
