"""The demo's data: scikit-learn's bundled handwritten digits, a fixed split, long-tailed subsets.

The split never depends on the training seed, so every method and seed sees the same test set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# The split is part of the experiment's definition, not of a run.
SPLIT_SEED = 0
TEST_PER_CLASS = 50


@dataclass(frozen=True)
class DigitsSplit:
    """Train and test arrays: 64 pixel intensities scaled to [0, 1], labels 0..9."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    def train_counts(self) -> list[int]:
        import torch

        return torch.bincount(self.train_y, minlength=self.num_classes).tolist()


def load_digits_split(test_per_class: int = TEST_PER_CLASS) -> DigitsSplit:
    """1,797 digits: ``test_per_class`` images of every class for testing, the rest for training."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    features, labels = load_digits(return_X_y=True)
    rng = np.random.default_rng(SPLIT_SEED)
    test_mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        test_mask[rng.choice(members, size=test_per_class, replace=False)] = True
    pixels = torch.tensor(features / 16.0, dtype=torch.float32)
    targets = torch.tensor(labels, dtype=torch.int64)
    train, test = torch.from_numpy(~test_mask), torch.from_numpy(test_mask)
    return DigitsSplit(
        pixels[train], targets[train], pixels[test], targets[test], int(labels.max()) + 1
    )


def long_tailed_counts(max_count: int, num_classes: int, imbalance_ratio: float) -> list[int]:
    """Exponential profile ``n_c = floor(max_count · ratio^(−c/(C−1)))``, at least one per class.

    Class 0 keeps ``max_count`` images and class C−1 about ``max_count / ratio``, as in the
    long-tailed CIFAR benchmarks.
    """
    if imbalance_ratio < 1:
        raise ValueError(f"imbalance_ratio must be >= 1, got {imbalance_ratio}")
    if num_classes < 2 or max_count < 1:
        raise ValueError(
            f"need num_classes >= 2 and max_count >= 1, got {num_classes}, {max_count}"
        )
    return [
        max(1, math.floor(max_count * imbalance_ratio ** (-c / (num_classes - 1))))
        for c in range(num_classes)
    ]


def long_tailed_subset(split: DigitsSplit, imbalance_ratio: float) -> DigitsSplit:
    """The training set cut to a long-tailed profile (fixed choice of images); the test set as is."""
    import numpy as np
    import torch

    max_count = min(split.train_counts())
    counts = long_tailed_counts(max_count, split.num_classes, imbalance_ratio)
    rng = np.random.default_rng(SPLIT_SEED)
    labels = split.train_y.numpy()
    keep = np.concatenate(
        [
            rng.choice(np.flatnonzero(labels == label), size=count, replace=False)
            for label, count in enumerate(counts)
        ]
    )
    keep = torch.from_numpy(np.sort(keep))
    return DigitsSplit(
        split.train_x[keep], split.train_y[keep], split.test_x, split.test_y, split.num_classes
    )
