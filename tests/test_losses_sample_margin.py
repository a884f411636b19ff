"""Our losses with the sample-margin regularizer built in, against the autograd definition."""

import math

import pytest
import torch
from pytorch_metric_learning import miners, reducers
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_largest_margin.losses import GeneralizedMarginSoftmaxLoss, LargestMarginSoftmaxLoss
from pml_largest_margin.losses.fused import fused_nontarget_logsumexp
from pml_largest_margin.margins import cosine_logits, sample_margins, sample_margins_from_cosines
from pml_largest_margin.regularizers import (
    SampleMarginRegularizer,
    ZeroCentroidRegularizer,
    with_sample_margin_regularizer,
)

NUM_CLASSES, DIM, LAMBDA = 7, 5, 0.3
LOSSES = {
    "lm": lambda **kw: LargestMarginSoftmaxLoss(NUM_CLASSES, DIM, scale=8.0, **kw),
    "gm-arcface": lambda **kw: GeneralizedMarginSoftmaxLoss.preset(
        "arcface", NUM_CLASSES, DIM, scale=8.0, **kw
    ),
    # A custom phi runs through autograd on the cosine matrix instead of the fused kernel.
    "gm-custom-phi": lambda **kw: GeneralizedMarginSoftmaxLoss(
        NUM_CLASSES, DIM, scale=8.0, m3=0.2, phi=lambda c: 0.9 * c, **kw
    ),
}


def batch(size=20, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(size, DIM, generator=generator, dtype=dtype)
    return embeddings, torch.randint(0, NUM_CLASSES, (size,), generator=generator)


def twin_losses(name, **regularized_kwargs):
    """The loss with λ·R_sm and the same loss (same W, float64) without it."""
    torch.manual_seed(0)
    plain = LOSSES[name]().double()
    regularized = LOSSES[name](
        sample_margin_regularizer=regularized_kwargs.pop(
            "sample_margin_regularizer", SampleMarginRegularizer()
        ),
        sample_margin_reg_weight=LAMBDA,
        **regularized_kwargs,
    ).double()
    with torch.no_grad():
        regularized.W.copy_(plain.W)
    return plain, regularized


def gradients(value, embeddings, W):
    return torch.autograd.grad(value, (embeddings, W))


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("mined", [False, True])
def test_value_and_gradients_match_the_autograd_definition(name, mined):
    plain, regularized = twin_losses(name)
    embeddings, labels = batch()
    embeddings.requires_grad_(True)
    indices_tuple = miners.MultiSimilarityMiner()(embeddings, labels) if mined else None
    if mined:
        assert len(indices_tuple[0]) > 0  # the miner really selected a subset
    miner_weights = lmu.convert_to_weights(indices_tuple, labels, dtype=torch.float64)
    if mined:
        assert (miner_weights < 1).any()

    margins = sample_margins(embeddings, labels, plain.W)  # the autograd definition
    expected = (
        plain(embeddings, labels, indices_tuple) + LAMBDA * (-(margins * miner_weights)).mean()
    )
    actual = regularized(embeddings, labels, indices_tuple)

    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    for got, want in zip(
        gradients(actual, embeddings, regularized.W),
        gradients(expected, embeddings, plain.W),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_sub_losses_reducers_and_stats(name):
    regularizer = SampleMarginRegularizer(reducer=reducers.SumReducer(), collect_stats=True)
    plain, regularized = twin_losses(
        name,
        sample_margin_regularizer=regularizer,
        weight_regularizer=ZeroCentroidRegularizer(),
        reducer=reducers.SumReducer(),
        collect_stats=True,
    )
    assert plain.sub_loss_names() == ["loss"]
    assert regularized.sub_loss_names() == ["loss", "sample_margin_loss", "weight_reg_loss"]
    assert isinstance(regularized.reducer, reducers.MultipleReducers)

    embeddings, labels = batch()
    margins = sample_margins(embeddings, labels, plain.W).detach()
    plain.reducer = reducers.SumReducer()
    expected = (
        plain(embeddings, labels)
        + LAMBDA * (-margins).sum()
        + ZeroCentroidRegularizer()(plain.W.t())
    )
    torch.testing.assert_close(regularized(embeddings, labels), expected, rtol=1e-10, atol=1e-10)
    assert regularizer.mean_sample_margin == pytest.approx(float(margins.mean()), abs=1e-12)
    assert regularizer.min_sample_margin == pytest.approx(float(margins.min()), abs=1e-12)
    assert regularized.mean_sample_margin == pytest.approx(float(margins.mean()), abs=1e-12)

    # DoNothingReducer exposes the sub-loss: λ·R_sm passed on already reduced.
    regularized.reducer = reducers.DoNothingReducer()
    loss_dict = regularized(embeddings, labels)
    assert loss_dict["sample_margin_loss"]["reduction_type"] == "already_reduced"
    torch.testing.assert_close(
        loss_dict["sample_margin_loss"]["losses"], LAMBDA * (-margins).sum(), rtol=1e-10, atol=0
    )


def test_the_regularizers_own_reducer_applies():
    regularizer = SampleMarginRegularizer(reducer=reducers.AvgNonZeroReducer())
    plain, regularized = twin_losses("lm", sample_margin_regularizer=regularizer)
    embeddings, labels = batch(size=40)
    margins = sample_margins(embeddings, labels, plain.W)
    negative = -margins
    assert (negative > 0).any() and (negative <= 0).any()
    expected = plain(embeddings, labels) + LAMBDA * negative[negative > 0].mean()
    torch.testing.assert_close(regularized(embeddings, labels), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("loss_class", [LargestMarginSoftmaxLoss, GeneralizedMarginSoftmaxLoss])
def test_factory_refuses_our_losses(loss_class):
    with pytest.raises(TypeError, match="already supports the sample-margin regularizer"):
        with_sample_margin_regularizer(loss_class)


def test_fused_margins_equal_the_definition_and_pass_gradcheck():
    embeddings, labels = batch(size=9)
    W = torch.randn(
        DIM, NUM_CLASSES, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    embeddings.requires_grad_(True)
    W.requires_grad_(True)

    def fused_margins(z, w):
        return fused_nontarget_logsumexp(z, w, labels, 8.0, with_margins=True)[2]

    assert torch.autograd.gradcheck(fused_margins, (embeddings, W))
    assert torch.autograd.gradcheck(
        lambda z, w: fused_nontarget_logsumexp(z, w, labels, 8.0, with_margins=True),
        (embeddings, W),
    )
    reference = sample_margins_from_cosines(cosine_logits(embeddings, W), labels)
    fused = fused_margins(embeddings, W)
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-14)
    weights = torch.randn(9, dtype=torch.float64)
    for got, want in zip(
        gradients(fused @ weights, embeddings, W),
        gradients(reference @ weights, embeddings, W),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


def test_tied_nearest_classes_share_the_gradient_like_amax():
    # Classes 0 and 1 are the same direction, so every sample of class 2 has them tied as nearest
    # non-target class; the values are exact in binary, so the tie is exact.
    W = torch.tensor([[1.0, 1.0, 0.0, -1.0], [0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    embeddings = torch.tensor([[1.0, 2.0], [3.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([2, 2, 3])
    upstream = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    grads = []
    for use_fused in (True, False):
        z, w = embeddings.clone().requires_grad_(True), W.clone().requires_grad_(True)
        if use_fused:
            margins = fused_nontarget_logsumexp(z, w, labels, 4.0, with_margins=True)[2]
        else:
            margins = sample_margins_from_cosines(cosine_logits(z, w), labels)
        grads.append(gradients(margins @ upstream, z, w))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # Both tied prototypes receive a gradient (split evenly), not only the first argmax.
    assert grads[0][1][:, 0].abs().sum() > 0 and grads[0][1][:, 1].abs().sum() > 0
    torch.testing.assert_close(grads[0][1][:, 0], grads[0][1][:, 1])


@pytest.mark.parametrize("name", ["lm", "gm-arcface"])
def test_bfloat16_inputs_are_finite_and_close(name):
    torch.manual_seed(0)
    loss_fn = LOSSES[name](sample_margin_regularizer=SampleMarginRegularizer())
    embeddings, labels = batch(size=32, dtype=torch.float32)
    reference = loss_fn(embeddings, labels)
    half = embeddings.to(torch.bfloat16).requires_grad_(True)
    loss = loss_fn(half, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and half.grad.dtype == torch.bfloat16
    assert torch.isfinite(half.grad.float()).all() and torch.isfinite(loss_fn.W.grad).all()
    assert math.isfinite(float(loss)) and abs(float(loss) - float(reference)) < 1e-2


def test_empty_batch_gives_zero_sub_losses():
    loss_fn = LargestMarginSoftmaxLoss(
        NUM_CLASSES, DIM, sample_margin_regularizer=SampleMarginRegularizer()
    )
    embeddings = torch.zeros(0, DIM, requires_grad=True)
    loss = loss_fn(embeddings, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert (loss_fn.W.grad == 0).all() and embeddings.grad.shape == (0, DIM)


def test_bad_input_is_still_caught():
    loss_fn = LargestMarginSoftmaxLoss(
        NUM_CLASSES, DIM, sample_margin_regularizer=SampleMarginRegularizer()
    )
    embeddings, labels = batch(dtype=torch.float32)
    with pytest.raises(ValueError, match="NaN|finite"):
        loss_fn(embeddings.index_fill(0, torch.tensor([3]), math.nan), labels)
    with pytest.raises(ValueError, match="range|\\[0"):
        loss_fn(embeddings, labels.index_fill(0, torch.tensor([0]), NUM_CLASSES))
    with pytest.raises(TypeError, match="sample_margin_regularizer"):
        LargestMarginSoftmaxLoss(NUM_CLASSES, DIM, sample_margin_regularizer="yes")
    regularizer = SampleMarginRegularizer()
    margins = torch.zeros(len(labels))
    with pytest.raises(ValueError, match="exactly one"):
        regularizer(embeddings, labels, cosines=torch.zeros(len(labels), 3), margins=margins)
    with pytest.raises(ValueError, match="margins must have shape"):
        regularizer(embeddings, labels, margins=margins[:-1])
