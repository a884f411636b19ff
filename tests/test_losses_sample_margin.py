"""Our losses with the sample-margin regularizer built in, against the autograd definition."""

import math

import pytest
import torch
from pytorch_metric_learning import miners, reducers
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_largest_margin.losses import (
    AdaFaceLoss,
    GeneralizedMarginSoftmaxLoss,
    LargestMarginSoftmaxLoss,
)
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


STATS = dict(collect_stats=True, record_target_cosines=True, record_class_margin=False)
STATS_LOSSES = {
    **LOSSES,
    "adaface": lambda **kw: AdaFaceLoss(NUM_CLASSES, DIM, scale=8.0, **kw),
}


def tied_batch(W: torch.Tensor):
    """Float64 embeddings and labels for prototypes ``W`` whose columns 1 and 2 are equal: rows
    near prototype 1 with label 0 have classes 1 and 2 tied (exactly) as nearest non-target."""
    generator = torch.Generator().manual_seed(3)
    near = W[:, 1] + 0.05 * torch.randn(6, DIM, generator=generator, dtype=torch.float64)
    embeddings = torch.cat([near, torch.randn(14, DIM, generator=generator, dtype=torch.float64)])
    labels = torch.cat(
        [torch.zeros(4, dtype=torch.long), torch.ones(2, dtype=torch.long)]
        + [torch.randint(0, NUM_CLASSES, (14,), generator=generator)]
    )
    return embeddings, labels


@pytest.mark.parametrize(
    "name, memory",
    [
        ("lm", "buffer"),
        ("lm", "stream"),
        ("gm-arcface", "buffer"),
        ("gm-arcface", "stream"),
        ("gm-custom-phi", "auto"),
        ("adaface", "buffer"),
        ("adaface", "stream"),
    ],
)
def test_stats_only_margins_equal_those_of_the_regularizer_path(name, memory):
    # Stats only: the margins come detached from the forward pass. With R_sm: the differentiable
    # margins the regularizer uses. The recorded values must be the same floats.
    torch.manual_seed(0)
    stats_only = STATS_LOSSES[name](memory=memory, **STATS).double()
    with torch.no_grad():
        stats_only.W[:, 2] = stats_only.W[:, 1]
    regularized = STATS_LOSSES[name](
        memory=memory,
        sample_margin_regularizer=SampleMarginRegularizer(),
        sample_margin_reg_weight=LAMBDA,
        **STATS,
    ).double()
    plain = STATS_LOSSES[name](memory=memory).double()
    for other in (regularized, plain):
        with torch.no_grad():
            other.W.copy_(stats_only.W)
    embeddings, labels = tied_batch(stats_only.W.detach())
    definition = sample_margins_from_cosines(cosine_logits(embeddings, stats_only.W), labels)
    cosines = cosine_logits(embeddings, stats_only.W.detach())
    nearest = cosines[:4].scatter(1, labels[:4, None], -math.inf).amax(dim=1)
    assert torch.equal(cosines[:4, 1], nearest) and torch.equal(cosines[:4, 2], nearest)  # ties
    # A miner's pairs that leave out three rows, tied ones among them: weight 0 in the loss.
    kept = torch.tensor([0, 1, 2, 4, 5, *range(7, 12), *range(13, 20)])
    indices_tuple = (kept, kept.roll(1), kept, kept.roll(2))
    miner_weights = lmu.convert_to_weights(indices_tuple, labels, dtype=torch.float64)
    assert (miner_weights[[3, 6, 12]] == 0).all() and (miner_weights[kept] == 1).all()

    grads = {}
    for key, loss_fn in (("stats", stats_only), ("regularized", regularized), ("plain", plain)):
        z = embeddings.clone().requires_grad_(True)
        grads[key] = gradients(loss_fn(z, labels, indices_tuple), z, loss_fn.W)
    for stat in ("mean_sample_margin", "min_sample_margin"):
        assert getattr(stats_only, stat) == getattr(regularized, stat)
    assert torch.equal(stats_only.target_cosines, regularized.target_cosines)
    assert torch.equal(stats_only.batch_sample_margins, regularized.batch_sample_margins)
    assert not stats_only.batch_sample_margins.requires_grad
    torch.testing.assert_close(stats_only.batch_sample_margins, definition, rtol=0, atol=1e-12)
    assert torch.equal(stats_only.target_labels, labels)
    assert not stats_only.target_cosines.requires_grad
    assert stats_only.mean_sample_margin == pytest.approx(float(definition.mean()), abs=1e-12)
    assert stats_only.min_sample_margin == pytest.approx(float(definition.min()), abs=1e-12)
    target = cosines.gather(1, labels[:, None]).squeeze(1)
    torch.testing.assert_close(stats_only.target_cosines, target, rtol=0, atol=1e-12)
    # Only the regularizer's margins carry a gradient (the stats' skip the nearest-class path).
    z = embeddings.clone().requires_grad_(True)
    for loss_fn, differentiable in ((stats_only, False), (regularized, True)):
        assert loss_fn.per_sample_losses(z, loss_fn.W, labels, True)[1].requires_grad is (
            differentiable
        )
    # Recording stats changes no gradient: backward has nothing to do for them.
    for got, want in zip(grads["stats"], grads["plain"], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("memory", ["buffer", "stream"])
def test_detached_fused_margins_are_the_differentiable_ones_without_a_gradient(memory):
    W = torch.randn(
        DIM, NUM_CLASSES, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    W[:, 2] = W[:, 1]  # exact ties among the nearest classes
    embeddings, labels = tied_batch(W)
    z, w = embeddings.requires_grad_(True), W.requires_grad_(True)
    kernel = dict(memory=memory, block_columns=3 if memory == "stream" else None)
    _, _, differentiable = fused_nontarget_logsumexp(z, w, labels, 8.0, with_margins=True, **kernel)
    lse, target, detached = fused_nontarget_logsumexp(
        z, w, labels, 8.0, detached_margins=True, **kernel
    )
    assert torch.equal(detached, differentiable.detach()) and not detached.requires_grad
    assert fused_nontarget_logsumexp(z, w, labels, 8.0, **kernel)[2] is None
    # Gradients of u and t are those of the plain call.
    plain_lse, plain_target, _ = fused_nontarget_logsumexp(z, w, labels, 8.0, **kernel)
    for got, want in zip(
        gradients(lse.sum() + target.sum(), z, w),
        gradients(plain_lse.sum() + plain_target.sum(), z, w),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="detached_margins"):
        fused_nontarget_logsumexp(z, w, labels, 8.0, with_margins=True, detached_margins=True)
