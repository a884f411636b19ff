import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from loss_utils import (
    float32_tolerances,
    reference_cosines,
    reference_lm_softmax,
    unreduced_losses,
)

from pml_largest_margin.losses import LargestMarginSoftmaxLoss
from pml_largest_margin.losses.functional import (
    largest_margin_softmax,
    largest_margin_softmax_head,
)
from pml_largest_margin.losses.fused import fused_nontarget_logsumexp
from pml_largest_margin.margins import cosine_logits, sample_margins


def make_batch(num_classes, dim, batch=12, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(batch, dim, generator=generator, dtype=dtype)
    labels = torch.randint(0, num_classes, (batch,), generator=generator)
    return embeddings, labels


@pytest.mark.parametrize("scale", [1.0, 8.0, 64.0])
@pytest.mark.parametrize(("num_classes", "dim"), [(2, 3), (10, 5), (40, 16)])
def test_matches_the_formula_written_out(scale, num_classes, dim):
    loss_fn = LargestMarginSoftmaxLoss(num_classes, dim, scale=scale)
    with torch.no_grad():
        loss_fn.W.copy_(torch.randn(dim, num_classes, generator=torch.Generator().manual_seed(5)))
    embeddings, labels = make_batch(num_classes, dim)
    W = loss_fn.W.detach()

    def reference(z, w):
        per_sample = torch.tensor(reference_lm_softmax(z, w, labels, scale), dtype=torch.float64)
        return per_sample, per_sample.mean().reshape(1)

    expected, expected_mean = reference(embeddings.double(), W.double())
    # float32 against float64, within what the conditioning of these inputs allows (the mean
    # may be near 0: an absolute bound, not a relative one, which once failed here).
    tolerance, mean_tolerance = float32_tolerances(reference, (embeddings.double(), W.double()))
    losses = unreduced_losses(loss_fn, embeddings, labels)
    assert float((losses.double() - expected).abs().max()) <= tolerance
    assert abs(loss_fn(embeddings, labels).item() - float(expected_mean)) <= mean_tolerance
    # and the float64 loss is the formula to rounding
    losses64 = unreduced_losses(loss_fn.double(), embeddings.double(), labels)
    torch.testing.assert_close(losses64, expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    num_classes=st.integers(2, 30),
    dim=st.integers(1, 8),
    scale=st.floats(0.5, 200.0),
    seed=st.integers(0, 10_000),
)
def test_per_sample_bound_around_the_negative_margin(num_classes, dim, scale, seed):
    loss_fn = LargestMarginSoftmaxLoss(num_classes, dim, scale=scale).double()
    embeddings, labels = make_batch(num_classes, dim, seed=seed, dtype=torch.float64)
    losses = unreduced_losses(loss_fn, embeddings, labels)
    negative_margins = -sample_margins(embeddings, labels, loss_fn.W.detach())
    slack = math.log(num_classes - 1) / scale
    assert bool((losses >= negative_margins - 1e-12).all())
    assert bool((losses <= negative_margins + slack + 1e-12).all())


def test_fused_path_equals_the_autograd_path():
    embeddings, labels = make_batch(50, 8, batch=20, dtype=torch.float64)
    W = torch.randn(8, 50, dtype=torch.float64)
    grads = []
    for use_fused in (True, False):
        z = embeddings.clone().requires_grad_(True)
        weights = W.clone().requires_grad_(True)
        if use_fused:
            lse, target, _ = fused_nontarget_logsumexp(z, weights, labels, 16.0)
            losses = largest_margin_softmax_head(lse, target, 16.0)
        else:
            losses = largest_margin_softmax(cosine_logits(z, weights), labels, 16.0)
        (losses * torch.linspace(0.1, 2.0, 20, dtype=torch.float64)).sum().backward()
        grads.append((losses.detach(), z.grad, weights.grad))
    for fused, plain in zip(*grads, strict=True):
        torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64():
    loss_fn = LargestMarginSoftmaxLoss(7, 5, scale=4.0).double()
    embeddings, labels = make_batch(7, 5, batch=6, dtype=torch.float64)
    W = loss_fn.W.detach().clone().requires_grad_(True)

    def loss_of(z, weights):
        return torch.func.functional_call(loss_fn, {"W": weights}, (z, labels))

    assert torch.autograd.gradcheck(loss_of, (embeddings.requires_grad_(True), W))


def test_collect_stats_records_the_batch_sample_margins():
    loss_fn = LargestMarginSoftmaxLoss(9, 4, collect_stats=True)
    embeddings, labels = make_batch(9, 4)
    loss_fn(embeddings, labels)
    margins = sample_margins(embeddings, labels, loss_fn.W.detach())
    assert loss_fn.mean_sample_margin == pytest.approx(float(margins.mean()), abs=1e-6)
    assert loss_fn.min_sample_margin == pytest.approx(float(margins.min()), abs=1e-6)
    assert "mean_sample_margin" in loss_fn._record_these_stats


def test_collect_stats_records_the_class_margin_of_W():
    loss_fn = LargestMarginSoftmaxLoss(9, 4, collect_stats=True)
    embeddings, labels = make_batch(9, 4)
    loss_fn(embeddings, labels)
    unit = torch.nn.functional.normalize(loss_fn.W.detach().double(), dim=0)
    cosines = (unit.t() @ unit).fill_diagonal_(-2.0)
    expected = math.degrees(math.acos(float(cosines.max())))
    assert loss_fn.class_margin_degrees == pytest.approx(expected, abs=1e-4)
    assert "class_margin_degrees" in loss_fn._record_these_stats
    quiet = LargestMarginSoftmaxLoss(9, 4, collect_stats=True, record_class_margin=False)
    quiet(embeddings, labels)
    assert "class_margin_degrees" not in quiet._record_these_stats
    assert not hasattr(quiet, "class_margin_degrees")


def test_empty_batch_gives_zero_loss_on_the_graph():
    loss_fn = LargestMarginSoftmaxLoss(5, 3)
    embeddings = torch.zeros(0, 3, requires_grad=True)
    loss = loss_fn(embeddings, torch.zeros(0, dtype=torch.long))
    assert float(loss) == 0.0
    loss.backward()
    assert embeddings.grad is not None and loss_fn.W.grad is not None
    assert float(loss_fn.W.grad.abs().sum()) == 0.0


def test_int32_labels_give_the_same_loss():
    loss_fn = LargestMarginSoftmaxLoss(6, 4)
    embeddings, labels = make_batch(6, 4)
    assert loss_fn(embeddings, labels.int()).item() == loss_fn(embeddings, labels).item()


@pytest.mark.parametrize(
    ("labels", "error", "message"),
    [
        (torch.tensor([0, 1, 5]), ValueError, r"\[0, 4\]"),
        (torch.tensor([0, -1, 2]), ValueError, r"\[0, 4\]"),
        (torch.tensor([0.0, 1.0, 2.0]), TypeError, "int64 or int32"),
        (torch.tensor([0, 1, 2], dtype=torch.int16), TypeError, "int64 or int32"),
        (torch.tensor([0, 1]), ValueError, "embeddings"),
    ],
)
def test_bad_labels(labels, error, message):
    with pytest.raises(error, match=message):
        LargestMarginSoftmaxLoss(5, 2)(torch.randn(3, 2), labels)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_embeddings_raise_unless_opted_out(bad):
    embeddings = torch.randn(3, 2)
    embeddings[1, 0] = bad
    labels = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="NaN or Inf"):
        LargestMarginSoftmaxLoss(3, 2)(embeddings, labels)
    LargestMarginSoftmaxLoss(3, 2, validate_inputs=False)(embeddings, labels)  # no check, no error


def test_bad_shapes_and_arguments():
    loss_fn = LargestMarginSoftmaxLoss(4, 3)
    with pytest.raises(ValueError, match="embedding_size=3"):
        loss_fn(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="2-D"):
        loss_fn(torch.randn(2, 3, 1), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="floating-point"):
        loss_fn(torch.ones(2, 3, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="ref_emb"):
        loss_fn(torch.randn(2, 3), torch.tensor([0, 1]), ref_emb=torch.randn(2, 3))
    with pytest.raises(ValueError, match="num_classes"):
        LargestMarginSoftmaxLoss(1, 3)
    with pytest.raises(ValueError, match="scale"):
        LargestMarginSoftmaxLoss(4, 3, scale=0.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    loss_fn = LargestMarginSoftmaxLoss(20, 8)
    embeddings, labels = make_batch(20, 8, batch=32)
    reference = loss_fn(embeddings, labels)
    half = embeddings.to(dtype).requires_grad_(True)
    loss = loss_fn(half, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and loss_fn.W.dtype == torch.float32
    assert half.grad.dtype == dtype and loss_fn.W.grad.dtype == torch.float32
    assert math.isfinite(float(loss)) and abs(float(loss) - float(reference)) < 1e-2
    # The same (rounded) inputs in float32: the whole computation and reduction ran in float32.
    assert float(loss) == pytest.approx(loss_fn(half.detach().float(), labels).item(), abs=1e-6)


def autocast_loss(device_type, dtype):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 8).to(device_type)
    loss_fn = LargestMarginSoftmaxLoss(20, 8).to(device_type)
    inputs = torch.randn(32, 6, device=device_type)
    labels = torch.randint(0, 20, (32,), device=device_type)
    reference = loss_fn(model(inputs), labels)
    with torch.autocast(device_type=device_type, dtype=dtype):
        embeddings = model(inputs)
        loss = loss_fn(embeddings, labels)
        logits = loss_fn.get_logits(embeddings)
    loss.backward()
    assert embeddings.dtype == dtype
    assert loss.dtype == torch.float32 and logits.dtype == torch.float32
    assert loss_fn.W.dtype == torch.float32 and loss_fn.W.grad.dtype == torch.float32
    assert torch.isfinite(loss_fn.W.grad).all()
    assert math.isfinite(float(loss)) and abs(float(loss) - float(reference)) < 1e-2


def test_cpu_autocast():
    autocast_loss("cpu", torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast():
    autocast_loss("cuda", torch.float16)


def test_float64_embeddings_keep_a_float32_W():
    loss_fn = LargestMarginSoftmaxLoss(6, 4)
    embeddings, labels = make_batch(6, 4, dtype=torch.float64)
    loss = loss_fn(embeddings, labels)
    loss.backward()
    assert loss.dtype == torch.float64 and loss_fn.W.grad.dtype == torch.float32


def test_get_logits_is_scaled_cosine_without_margin():
    loss_fn = LargestMarginSoftmaxLoss(6, 4, scale=10.0)
    embeddings, _ = make_batch(6, 4)
    logits = loss_fn.get_logits(embeddings.half())
    expected = 10.0 * reference_cosines(embeddings.half().float(), loss_fn.W.detach())
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
