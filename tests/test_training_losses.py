"""The demo's plain softmax baseline and the loss factory shared by ``demo`` and ``train``."""

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from pml_largest_margin.losses import GeneralizedMarginSoftmaxLoss, LargestMarginSoftmaxLoss
from pml_largest_margin.training.loss_factory import LOSS_NAMES, build_loss
from pml_largest_margin.training.softmax_cross_entropy_loss import SoftmaxCrossEntropyLoss


def test_softmax_cross_entropy_matches_torch_with_gradients():
    torch.manual_seed(0)
    loss_func = SoftmaxCrossEntropyLoss(num_classes=5, embedding_size=4).double()
    embeddings = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (12,))
    loss = loss_func(embeddings, labels)
    W = loss_func.W.detach().clone().requires_grad_(True)
    reference = torch.nn.functional.cross_entropy(embeddings @ W, labels)
    assert torch.allclose(loss, reference)
    grad_embeddings, grad_W = torch.autograd.grad(loss, (embeddings, loss_func.W))
    ref_embeddings, ref_W = torch.autograd.grad(reference, (embeddings, W))
    assert torch.allclose(grad_embeddings, ref_embeddings) and torch.allclose(grad_W, ref_W)
    assert loss_func.W.shape == (4, 5)
    assert torch.equal(loss_func.get_logits(embeddings), embeddings @ loss_func.W)


def test_softmax_cross_entropy_gradcheck():
    torch.manual_seed(1)
    loss_func = SoftmaxCrossEntropyLoss(num_classes=3, embedding_size=2).double()
    embeddings = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 1, 0])
    assert torch.autograd.gradcheck(lambda e: loss_func(e, labels), (embeddings,))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_loss_owns_prototypes_in_pml_layout(name):
    torch.manual_seed(0)
    loss = build_loss(name, 6, 8, scale=10.0, class_counts=[1, 2, 3, 4, 5, 6])
    assert loss.W.shape == (8, 6)
    value = loss(torch.randn(10, 8), torch.randint(0, 6, (10,)))
    assert torch.isfinite(value)
    assert loss.get_logits(torch.randn(3, 8)).shape == (3, 6)


def test_names_map_to_the_expected_classes():
    assert isinstance(build_loss("lm-softmax", 4, 3), LargestMarginSoftmaxLoss)
    normface = build_loss("normface", 4, 3, scale=8.0)
    assert isinstance(normface, pml_losses.NormalizedSoftmaxLoss)
    assert normface.temperature == pytest.approx(1 / 8)
    arcface = build_loss("arcface", 4, 3)
    assert type(arcface) is GeneralizedMarginSoftmaxLoss and arcface.m2 == pytest.approx(0.5)
    assert build_loss("cosface", 4, 3, margin=0.2).margin == pytest.approx(0.2)


@pytest.mark.parametrize("name", ["normface", "lm-softmax", "softmax"])
def test_regularizers_appear_as_sub_losses(name):
    loss = build_loss(name, 4, 3, sample_margin_weight=0.5, zero_centroid_weight=1.0)
    names = loss.sub_loss_names()
    assert "sample_margin_loss" in names and "weight_reg_loss" in names
    assert loss.sample_margin_reg_weight == 0.5 and loss.weight_reg_weight == 1.0
    assert isinstance(loss, type(build_loss(name, 4, 3)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown loss 'foo'"):
        build_loss("foo", 4, 3)
    with pytest.raises(ValueError, match="scale"):
        build_loss("normface", 4, 3, scale=0)
    with pytest.raises(ValueError, match="'lm-softmax' has no margin option"):
        build_loss("lm-softmax", 4, 3, margin=0.3)
    with pytest.raises(ValueError, match="non-negative"):
        build_loss("normface", 4, 3, sample_margin_weight=-1)


def test_angular_margins_are_radians_for_every_loss():
    import math

    arcface = build_loss("arcface", 4, 3, margin=0.3)
    # GM-Softmax's arcface preset takes radians; PML's ArcFaceLoss (degrees) is the reference.
    assert arcface.m2 == pytest.approx(0.3)
    assert build_loss("arcface", 4, 3).m2 == pytest.approx(0.5)
    assert build_loss("curricularface", 4, 3, margin=0.3).margin == pytest.approx(0.3)
    reference = pml_losses.ArcFaceLoss(4, 3, margin=math.degrees(0.3), scale=10.0)
    reference.W.data.copy_(arcface.W.data)
    embeddings, labels = torch.randn(6, 3), torch.arange(6) % 4
    assert torch.allclose(arcface(embeddings, labels), reference(embeddings, labels))


def test_scale_reaches_sphereface_and_defaults_to_pmls():
    assert build_loss("sphereface", 4, 3, scale=3.0).scale == 3.0
    assert build_loss("sphereface", 4, 3).scale == 1.0
    assert build_loss("sphereface", 4, 3, margin=3).margin == 3


@pytest.mark.parametrize(
    "name, margin, message",
    [
        ("arcface", 1000.0, r"\[0, π\) \(radians\)"),
        ("cosface", 2.0, r"\[0, 2\) \(cosine\)"),
        ("sphereface", 4.5, r"an integer in \[1, 20\]"),
        ("sphereface", 0.0, "out of range"),
        ("adaface", 1.6, r"\[0, π/2\)"),
        ("elasticface-arc", float("nan"), "out of range"),
    ],
)
def test_margins_out_of_range(name, margin, message):
    with pytest.raises(ValueError, match=message):
        build_loss(name, 4, 3, margin=margin)


def test_scale_options_of_the_registry():
    from pml_largest_margin.training.loss_registry import check_loss_options

    with pytest.raises(ValueError, match="'softmax' has no scale option; --scale applies to"):
        check_loss_options("softmax", 5.0, None)
    with pytest.raises(ValueError, match="'adacos-fixed' has no scale option"):
        check_loss_options("adacos-fixed", 5.0, None)
    with pytest.raises(ValueError, match="unknown loss 'triplet'"):
        check_loss_options("triplet", None, None)
    check_loss_options("sphereface", 2.0, 4)


@pytest.mark.parametrize("name", ["arcface", "lm-softmax"])
def test_sub_centers_reach_the_losses_that_take_them(name):
    loss = build_loss(name, 4, 3, sub_centers=2, record_margins=True)
    assert loss.sub_centers == 2 and loss.W.shape == (3, 8)
    embeddings, labels = torch.randn(6, 3), torch.arange(6) % 4
    assert torch.isfinite(loss(embeddings, labels))
    assert loss.get_logits(embeddings).shape == (6, 4)


def test_sub_centers_are_refused_elsewhere_and_below_one():
    with pytest.raises(ValueError, match="'cosface' has no sub-centres.*arcface, lm-softmax"):
        build_loss("cosface", 4, 3, sub_centers=2)
    with pytest.raises(ValueError, match="sub-centers must be an integer >= 1"):
        build_loss("arcface", 4, 3, sub_centers=0)
    assert build_loss("cosface", 4, 3, sub_centers=1).W.shape == (3, 4)


@pytest.mark.parametrize(
    ("arguments", "error", "name"),
    [
        ((True, 4), TypeError, "num_classes"),
        ((1, 4), ValueError, "num_classes"),
        ((5, 4.0), TypeError, "embedding_size"),
        ((5, 0), ValueError, "embedding_size"),
    ],
)
def test_softmax_cross_entropy_sizes_are_checked_like_the_library_losses(arguments, error, name):
    with pytest.raises(error, match=name):
        SoftmaxCrossEntropyLoss(*arguments)
    loss_func = SoftmaxCrossEntropyLoss(torch.tensor(5), 4)
    assert type(loss_func.num_classes) is int and loss_func.W.shape == (4, 5)
