import math

import pytest
import torch

from pml_largest_margin.margins import (
    class_margin,
    class_margin_upper_bound,
    sample_margin_upper_bound,
    sample_margins,
)


def naive_class_margin(W):
    unit = torch.nn.functional.normalize(W.double(), dim=0)
    cosines = unit.t() @ unit
    cosines.fill_diagonal_(-math.inf)
    return math.acos(float(cosines.max().clamp(-1, 1)))


@pytest.mark.parametrize(
    "num_classes,dim,block", [(2, 3, None), (17, 5, 1), (50, 8, 7), (300, 16, None)]
)
def test_class_margin_matches_naive(num_classes, dim, block):
    W = torch.randn(dim, num_classes, dtype=torch.float64) * torch.rand(
        num_classes, dtype=torch.float64
    )
    result = class_margin(W, block_size=block)
    assert result.radians == pytest.approx(naive_class_margin(W), abs=1e-12)
    j, k = result.closest_pair
    assert j < k
    pair_angle = math.acos(
        float(torch.nn.functional.cosine_similarity(W[:, j], W[:, k], dim=0).clamp(-1, 1))
    )
    assert pair_angle == pytest.approx(result.radians, abs=1e-12)
    assert result.degrees == pytest.approx(math.degrees(result.radians))


def test_class_margin_of_orthonormal_prototypes_is_right_angle():
    assert class_margin(torch.eye(6)).radians == pytest.approx(math.pi / 2)


def test_bounds_closed_forms():
    assert class_margin_upper_bound(10, 32) == pytest.approx(math.acos(-1 / 9))
    assert class_margin_upper_bound(2, 1) == pytest.approx(math.pi)
    assert class_margin_upper_bound(100, 16) == pytest.approx(math.pi / 2)
    assert sample_margin_upper_bound(10) == pytest.approx(10 / 9)


def test_sample_margins_hand_made():
    W = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]])  # prototypes at 0°, 90°, 180°
    embeddings = torch.tensor([[3.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    expected = torch.tensor([1.0 - 0.0, math.sqrt(0.5) - math.sqrt(0.5), 0.0 - 1.0])
    torch.testing.assert_close(sample_margins(embeddings, labels, W), expected)
    torch.testing.assert_close(sample_margins(embeddings, labels, W, block_size=1), expected)


@pytest.mark.parametrize(
    "embeddings,labels,W,error",
    [
        (torch.randn(4, 3), torch.tensor([0, 1, 2, 5]), torch.randn(3, 4), ValueError),
        (torch.randn(4, 3), torch.tensor([0, 1, 2]), torch.randn(3, 4), ValueError),
        (torch.randn(4, 3), torch.tensor([0.0, 1, 2, 3]), torch.randn(3, 4), TypeError),
        (torch.randn(4, 3), torch.tensor([0, 1, 2, 3]), torch.randn(4, 3), ValueError),
        (torch.full((4, 3), math.nan), torch.tensor([0, 1, 2, 3]), torch.randn(3, 4), ValueError),
    ],
)
def test_sample_margins_bad_input(embeddings, labels, W, error):
    with pytest.raises(error):
        sample_margins(embeddings, labels, W)


def test_class_margin_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        class_margin(torch.randn(3, 1))
    with pytest.raises(ValueError, match="zero prototype"):
        class_margin(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="NaN"):
        class_margin(torch.tensor([[math.inf, 1.0], [0.0, 1.0]]))
