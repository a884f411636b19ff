import math

import pytest
import torch
from pytorch_metric_learning import losses

from pml_largest_margin.losses import GeneralizedMarginSoftmaxLoss, LargestMarginSoftmaxLoss
from pml_largest_margin.losses.base_margin_softmax_loss import BaseMarginSoftmaxLoss
from pml_largest_margin.margins import class_margin, class_margin_upper_bound
from pml_largest_margin.prototypes import (
    SeparatedPrototypes,
    freeze_prototypes,
    max_separated_prototypes,
    simplex_prototypes,
)
from pml_largest_margin.regularizers import (
    SampleMarginRegularizer,
    ZeroCentroidRegularizer,
    with_sample_margin_regularizer,
)


@pytest.mark.parametrize("num_classes,dim", [(2, 1), (2, 5), (4, 3), (11, 10), (20, 128)])
def test_simplex_is_exact(num_classes, dim):
    W = simplex_prototypes(num_classes, dim, dtype=torch.float64)
    assert W.shape == (dim, num_classes)
    torch.testing.assert_close(
        torch.linalg.vector_norm(W, dim=0), torch.ones(num_classes, dtype=torch.float64)
    )
    torch.testing.assert_close(W.sum(dim=1), torch.zeros(dim, dtype=torch.float64))
    gram = W.t() @ W
    off_diagonal = gram[~torch.eye(num_classes, dtype=torch.bool)]
    torch.testing.assert_close(off_diagonal, torch.full_like(off_diagonal, -1 / (num_classes - 1)))
    assert class_margin(W).radians == pytest.approx(math.acos(-1 / (num_classes - 1)), abs=1e-12)


def test_simplex_bad_input():
    with pytest.raises(ValueError, match="max_separated_prototypes"):
        simplex_prototypes(5, 3)
    with pytest.raises(ValueError, match="num_classes"):
        simplex_prototypes(1, 3)
    with pytest.raises(TypeError, match="embedding_size"):
        simplex_prototypes(3, 2.0)


def test_max_separated_returns_the_simplex_when_it_fits():
    result = max_separated_prototypes(8, 7, progress=False)
    assert result.steps == 0
    assert result.radians == pytest.approx(result.upper_bound, abs=1e-6)
    assert result.upper_bound == pytest.approx(class_margin_upper_bound(8, 7))


@pytest.mark.parametrize(
    "num_classes,dim,floor_degrees", [(10, 3, 66.0), (20, 3, 47.3), (100, 16, 76.5)]
)
def test_max_separated_reaches_the_issue_floors(num_classes, dim, floor_degrees):
    result = max_separated_prototypes(num_classes, dim, progress=False)
    assert isinstance(result, SeparatedPrototypes)
    assert result.prototypes.shape == (dim, num_classes)
    assert result.degrees >= floor_degrees
    assert result.degrees <= result.upper_bound_degrees
    assert result.radians == pytest.approx(class_margin(result.prototypes).radians)
    torch.testing.assert_close(
        torch.linalg.vector_norm(result.prototypes, dim=0), torch.ones(num_classes)
    )


def test_max_separated_is_seeded_and_shows_progress(capsys):
    first = max_separated_prototypes(12, 3, steps=50, seed=3, progress=True)
    assert "prototypes" in capsys.readouterr().err
    second = max_separated_prototypes(12, 3, steps=50, seed=3, progress=False)
    torch.testing.assert_close(first.prototypes, second.prototypes)
    other = max_separated_prototypes(12, 3, steps=50, seed=4, progress=False)
    assert not torch.equal(first.prototypes, other.prototypes)


def test_max_separated_bad_input():
    with pytest.raises(ValueError, match="embedding_size >= 2"):
        max_separated_prototypes(3, 1, progress=False)
    with pytest.raises(ValueError, match="steps"):
        max_separated_prototypes(12, 3, steps=0, progress=False)
    with pytest.raises(ValueError, match="temperature"):
        max_separated_prototypes(12, 3, start_temperature=0.01, end_temperature=0.1)
    with pytest.raises(ValueError, match="restarts"):
        max_separated_prototypes(12, 3, restarts=0)


def regularized_loss(loss_class):
    # Our losses take the sample-margin regularizer natively; PML's through the factory.
    kwargs = {
        "num_classes": 5,
        "embedding_size": 4,
        "weight_regularizer": ZeroCentroidRegularizer(),
    }
    if issubclass(loss_class, BaseMarginSoftmaxLoss):
        return loss_class(sample_margin_regularizer=SampleMarginRegularizer(), **kwargs)
    return with_sample_margin_regularizer(loss_class)(**kwargs)


@pytest.mark.parametrize(
    "loss_class",
    [
        losses.ArcFaceLoss,
        losses.CosFaceLoss,
        losses.NormalizedSoftmaxLoss,
        LargestMarginSoftmaxLoss,
        GeneralizedMarginSoftmaxLoss,
    ],
)
@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.AdamW])
def test_frozen_prototypes_stay_unchanged(loss_class, optimizer_class):
    loss = regularized_loss(loss_class)
    trunk = torch.nn.Linear(6, 4)
    # Built before freezing, with weight decay and one earlier step that left a gradient on W.
    optimizer = optimizer_class([*trunk.parameters(), *loss.parameters()], lr=0.1, weight_decay=0.1)
    data, labels = torch.randn(10, 6), torch.arange(10) % 5
    loss(trunk(data), labels).backward()
    optimizer.step()
    prototypes = simplex_prototypes(5, 4) * 2.0
    assert freeze_prototypes(loss, prototypes) is loss
    frozen = loss.W.detach().clone()
    torch.testing.assert_close(frozen, simplex_prototypes(5, 4))
    for _ in range(2):
        optimizer.zero_grad()
        loss(trunk(data), labels).backward()
        optimizer.step()
    assert torch.equal(loss.W, frozen)
    assert loss.W.grad is None


def test_freeze_accepts_a_result_and_checks_shapes():
    result = max_separated_prototypes(6, 2, steps=20, progress=False)
    loss = losses.CosFaceLoss(num_classes=6, embedding_size=2)
    freeze_prototypes(loss, result)
    assert class_margin(loss.W).radians == pytest.approx(result.radians, abs=1e-6)
    with pytest.raises(ValueError, match="PML's layout"):
        freeze_prototypes(loss, result.prototypes.t())
    with pytest.raises(TypeError, match="no prototype Parameter"):
        freeze_prototypes(losses.ContrastiveLoss(), result)
    with pytest.raises(ValueError, match="zero column"):
        freeze_prototypes(loss, torch.zeros(2, 6))
    with pytest.raises(ValueError, match="NaN"):
        freeze_prototypes(loss, torch.full((2, 6), math.nan))
