import math

import pytest
import torch

from pml_largest_margin.demo.data import (
    TEST_PER_CLASS,
    load_digits_split,
    long_tailed_counts,
    long_tailed_subset,
)


@pytest.fixture(scope="module")
def split():
    return load_digits_split()


def test_split_is_fixed_balanced_and_disjoint(split):
    assert torch.bincount(split.test_y).tolist() == [TEST_PER_CLASS] * 10
    assert len(split.train_y) + len(split.test_y) == 1797
    again = load_digits_split()
    assert torch.equal(again.train_x, split.train_x) and torch.equal(again.test_y, split.test_y)
    train_rows = {tuple(row.tolist()) for row in split.train_x}
    overlap = sum(tuple(row.tolist()) in train_rows for row in split.test_x)
    # load_digits holds a few exact duplicate images; the split itself shares no index.
    assert overlap < 10
    assert 0.0 <= float(split.train_x.min()) and float(split.train_x.max()) <= 1.0


@pytest.mark.parametrize("ratio", [1, 10, 100])
def test_long_tailed_counts_follow_the_exponential_profile(ratio):
    counts = long_tailed_counts(124, 10, ratio)
    assert counts[0] == 124
    assert counts[-1] == max(1, math.floor(124 / ratio))
    assert counts == sorted(counts, reverse=True)
    for c, count in enumerate(counts):
        assert count == max(1, math.floor(124 * ratio ** (-c / 9)))


def test_long_tailed_counts_reject_bad_input():
    with pytest.raises(ValueError, match="imbalance_ratio"):
        long_tailed_counts(100, 10, 0.5)
    with pytest.raises(ValueError, match="num_classes"):
        long_tailed_counts(100, 1, 10)


@pytest.mark.parametrize("ratio", [10, 100])
def test_long_tailed_subset_keeps_the_test_set(split, ratio):
    subset = long_tailed_subset(split, ratio)
    expected = long_tailed_counts(min(split.train_counts()), 10, ratio)
    assert subset.train_counts() == expected
    assert subset.test_x is split.test_x
    # Every kept image is a training image of the same class.
    rows = {tuple(r.tolist()): int(y) for r, y in zip(split.train_x, split.train_y, strict=True)}
    assert all(
        rows[tuple(r.tolist())] == int(y)
        for r, y in zip(subset.train_x, subset.train_y, strict=True)
    )
