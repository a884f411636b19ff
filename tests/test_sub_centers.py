"""Sub-centres (k prototypes per class) in LM-Softmax and GM-Softmax, against PML's
SubCenterArcFaceLoss and the formula written out (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from loss_utils import reference_cosines
from pytorch_metric_learning.losses import SubCenterArcFaceLoss

from pml_largest_margin.losses import (
    AdaFaceLoss,
    CurricularFaceLoss,
    GeneralizedMarginSoftmaxLoss,
    LargestMarginSoftmaxLoss,
)
from pml_largest_margin.losses import _sub_centers as sub_centers_module
from pml_largest_margin.margins import class_margin, sample_margins
from pml_largest_margin.regularizers import SampleMarginRegularizer

NUM_CLASSES, DIM, BATCH, K = 7, 5, 12, 3


def problem(dtype=torch.float64):
    generator = torch.Generator().manual_seed(5)
    W = torch.randn(DIM, NUM_CLASSES * K, generator=generator, dtype=dtype)
    embeddings = 3 * torch.randn(BATCH, DIM, generator=generator, dtype=dtype)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=generator)
    return embeddings, labels, W


def with_W(loss_fn, W):
    loss_fn = loss_fn.double()
    with torch.no_grad():
        loss_fn.W.copy_(W)
    return loss_fn


def loss_and_grads(loss_fn, embeddings, labels):
    z = embeddings.clone().requires_grad_(True)
    loss = loss_fn(z, labels)
    grad_z, grad_w = torch.autograd.grad(loss, [z, loss_fn.W])
    return loss.detach(), grad_z, grad_w


def assert_all_close(got, want, tol=1e-10):
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def class_cosines(embeddings, W):
    """Written out: each class's cosine is the best of its K consecutive columns."""
    cosines = reference_cosines(embeddings, W)
    return torch.stack(
        [cosines[:, c * K : (c + 1) * K].max(dim=1).values for c in range(NUM_CLASSES)], dim=1
    )


@pytest.mark.parametrize("memory", ["buffer", "stream"])
def test_arcface_preset_equals_pml_sub_center_arcface(memory, monkeypatch):
    # Blocks of 2 classes (6 columns) on the streaming path: several blocks, one of 3 classes.
    monkeypatch.setattr(
        sub_centers_module, "stream_block_columns", lambda n, device, dtype=None: 2 * K
    )
    embeddings, labels, W = problem()
    ours = with_W(
        GeneralizedMarginSoftmaxLoss.preset(
            "arcface", NUM_CLASSES, DIM, margin=0.5, scale=64.0, sub_centers=K, memory=memory
        ),
        W,
    )
    pml = with_W(
        SubCenterArcFaceLoss(
            num_classes=NUM_CLASSES,
            embedding_size=DIM,
            margin=math.degrees(0.5),
            scale=64.0,
            sub_centers=K,
        ),
        W,
    )
    assert ours.W.shape == pml.W.shape == (DIM, NUM_CLASSES * K)
    assert_all_close(
        loss_and_grads(ours, embeddings, labels), loss_and_grads(pml, embeddings, labels)
    )


def test_lm_softmax_matches_formula_with_sub_centers():
    embeddings, labels, W = problem()
    scale = 16.0

    def formula(z, w):
        cosines = class_cosines(z, w)
        target = cosines.gather(1, labels[:, None])
        others = (scale * (cosines - target)).scatter(1, labels[:, None], -math.inf)
        return (torch.logsumexp(others, dim=1) / scale).mean()

    z, w = embeddings.clone().requires_grad_(True), W.clone().requires_grad_(True)
    expected = formula(z, w)
    want = (expected.detach(), *torch.autograd.grad(expected, [z, w]))
    for memory in ("buffer", "stream"):
        loss_fn = LargestMarginSoftmaxLoss(
            NUM_CLASSES, DIM, scale=scale, sub_centers=K, memory=memory
        )
        assert_all_close(loss_and_grads(with_W(loss_fn, W), embeddings, labels), want)


def test_one_sub_center_is_the_plain_loss_and_stream_equals_buffer(monkeypatch):
    monkeypatch.setattr(sub_centers_module, "stream_block_columns", lambda n, device, dtype=None: K)
    embeddings, labels, W = problem()
    plain = with_W(LargestMarginSoftmaxLoss(NUM_CLASSES * K, DIM), W)
    single = with_W(LargestMarginSoftmaxLoss(NUM_CLASSES * K, DIM, sub_centers=1), W)
    assert_all_close(
        loss_and_grads(plain, embeddings, labels), loss_and_grads(single, embeddings, labels)
    )
    # Blocks of 1 class are widened to 2: every row keeps a non-target class in each block.
    results = [
        loss_and_grads(
            with_W(
                GeneralizedMarginSoftmaxLoss(
                    NUM_CLASSES, DIM, m3=0.2, sub_centers=K, memory=memory
                ),
                W,
            ),  # fmt: skip
            embeddings,
            labels,
        )
        for memory in ("buffer", "stream")
    ]
    assert_all_close(*results)


def test_sample_margin_regularizer_reads_the_sub_center_margins():
    embeddings, labels, W = problem()
    loss_fn = with_W(
        LargestMarginSoftmaxLoss(
            NUM_CLASSES, DIM, sub_centers=K, sample_margin_regularizer=SampleMarginRegularizer(),
            sample_margin_reg_weight=0.5, collect_stats=True, record_target_cosines=True,
        ),
        W,
    )  # fmt: skip
    plain = with_W(LargestMarginSoftmaxLoss(NUM_CLASSES, DIM, sub_centers=K), W)
    regularizer = SampleMarginRegularizer().double()

    def expected_total(z, w):
        margins = sample_margins(z, labels, w, sub_centers=K)
        return plain(z, labels) + 0.5 * regularizer(z, labels, margins=margins)

    z = embeddings.clone().requires_grad_(True)
    expected = expected_total(z, plain.W)
    want = (expected.detach(), *torch.autograd.grad(expected, [z, plain.W]))
    assert_all_close(loss_and_grads(loss_fn, embeddings, labels), want)
    cosines = class_cosines(embeddings, W)
    margins = sample_margins(embeddings, labels, W, sub_centers=K)
    assert loss_fn.min_sample_margin == pytest.approx(float(margins.min()), abs=1e-12)
    torch.testing.assert_close(loss_fn.target_cosines, cosines.gather(1, labels[:, None])[:, 0])
    # The class margin skips pairs of sub-centres of one class.
    want_margin = class_margin(W, sub_centers=K)
    assert loss_fn.class_margin_degrees == pytest.approx(want_margin.degrees)


def test_class_margin_with_sub_centers_skips_pairs_of_one_class():
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(DIM, NUM_CLASSES * K, generator=generator, dtype=torch.float64)
    W[:, 1] = W[:, 0] + 1e-3  # two sub-centres of class 0, almost equal
    unit = W / W.norm(dim=0)
    angles = torch.acos((unit.t() @ unit).clamp(-1, 1))
    same = (torch.arange(NUM_CLASSES * K)[:, None] // K) == (torch.arange(NUM_CLASSES * K) // K)
    expected = float(angles.masked_fill(same, math.inf).min())
    for block_size in (None, 4, 5):  # tiles that cut through a class's sub-centres
        margin = class_margin(W, block_size, sub_centers=K)
        assert margin.radians == pytest.approx(expected, abs=1e-9)
        j, k = margin.closest_pair
        assert j < k < NUM_CLASSES
    assert class_margin(W).radians < 1e-2  # without sub-centres: the near pair of class 0
    with pytest.raises(ValueError, match="multiple of sub_centers"):
        class_margin(W, sub_centers=4)


def test_get_logits_take_the_best_sub_center():
    embeddings, _, W = problem()
    loss_fn = with_W(GeneralizedMarginSoftmaxLoss.preset("arcface", NUM_CLASSES, DIM,
                                                         sub_centers=K), W)  # fmt: skip
    torch.testing.assert_close(loss_fn.get_logits(embeddings), 64.0 * class_cosines(embeddings, W))


def test_pml_tie_among_sub_centers_is_shared():
    """Two identical sub-centres: the value is PML's, the gradient split evenly between them."""
    embeddings, labels, W = problem()
    W[:, 1] = W[:, 0]
    loss_fn = with_W(GeneralizedMarginSoftmaxLoss.preset("arcface", NUM_CLASSES, DIM,
                                                         sub_centers=K), W)  # fmt: skip
    pml = with_W(SubCenterArcFaceLoss(num_classes=NUM_CLASSES, embedding_size=DIM,
                                      margin=math.degrees(0.5), sub_centers=K), W)  # fmt: skip
    loss, _, grad_w = loss_and_grads(loss_fn, embeddings, labels)
    pml_loss, _, pml_grad_w = loss_and_grads(pml, embeddings, labels)
    torch.testing.assert_close(loss, pml_loss, atol=1e-10, rtol=1e-10)
    assert grad_w[:, 0].abs().sum() > 0
    torch.testing.assert_close(grad_w[:, 0], grad_w[:, 1], atol=1e-12, rtol=0)
    # PML's max routes the tie's gradient to one of the two; the sum is the same.
    torch.testing.assert_close(grad_w[:, :2].sum(1), pml_grad_w[:, :2].sum(1), atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda: LargestMarginSoftmaxLoss(NUM_CLASSES, DIM, sub_centers=0), ValueError, "sub_centers"),
        (lambda: LargestMarginSoftmaxLoss(NUM_CLASSES, DIM, sub_centers=2.0), TypeError, "sub_centers"),
        (lambda: AdaFaceLoss(NUM_CLASSES, DIM, sub_centers=2), ValueError, "sub_centers > 1"),
        (lambda: CurricularFaceLoss(NUM_CLASSES, DIM, sub_centers=2), ValueError, "sub_centers > 1"),
    ],
)  # fmt: skip
def test_bad_sub_centers(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_labels_are_classes_not_sub_centers():
    loss_fn = LargestMarginSoftmaxLoss(NUM_CLASSES, DIM, sub_centers=K)
    with pytest.raises(ValueError, match="labels"):
        loss_fn(torch.randn(2, DIM), torch.tensor([0, NUM_CLASSES]))


def test_auto_memory_sizes_the_buffer_in_the_weights_dtype(monkeypatch):
    # 4 rows × 12 sub-centre columns: 192 bytes in float32, 384 in float64. With a limit between
    # the two, "auto" keeps the buffer for float32 weights and streams for float64 ones.
    from pml_largest_margin.losses import fused

    monkeypatch.setattr(fused, "BUFFER_LIMIT_BYTES", 256)
    streamed = []
    original = sub_centers_module.stream_block_columns

    def recording(*args):
        streamed.append(args[-1])
        return original(*args)

    monkeypatch.setattr(sub_centers_module, "stream_block_columns", recording)
    generator = torch.Generator().manual_seed(12)
    labels = torch.tensor([0, 1, 2, 3])
    for dtype in (torch.float32, torch.float64):
        embeddings = torch.randn(4, 5, generator=generator, dtype=dtype)
        weights = torch.randn(5, 12, generator=generator, dtype=dtype)
        sub_centers_module.sub_center_statistics(embeddings, weights, labels, 16.0, 3)
    assert streamed == [torch.float64]
