import math

import pytest
import torch
from loss_utils import (
    float32_tolerances,
    reference_gm_softmax,
    reference_lm_softmax,
    unreduced_losses,
)
from pytorch_metric_learning import losses as pml_losses

from pml_largest_margin.losses import GeneralizedMarginSoftmaxLoss, LargestMarginSoftmaxLoss
from pml_largest_margin.losses.margin_functions import (
    angles_of,
    chebyshev_cosine_multiple,
    combined_margin,
)
from pml_largest_margin.margins import class_margin, cosine_logits, sample_margins

NUM_CLASSES, DIM, BATCH, SCALE = 10, 6, 24, 16.0
PML_TWINS = {
    "normface": (lambda: pml_losses.NormalizedSoftmaxLoss(NUM_CLASSES, DIM, 1 / SCALE), {}),
    "cosface": (
        lambda: pml_losses.CosFaceLoss(NUM_CLASSES, DIM, margin=0.3, scale=SCALE),
        {"margin": 0.3},
    ),
    "arcface": (
        lambda: pml_losses.ArcFaceLoss(NUM_CLASSES, DIM, margin=math.degrees(0.6), scale=SCALE),
        {"margin": 0.6},
    ),
    "sphereface": (
        lambda: pml_losses.SphereFaceLoss(NUM_CLASSES, DIM, margin=3, scale=SCALE),
        {"margin": 3},
    ),
}


def twin_losses(name, dtype):
    make_pml, margin = PML_TWINS[name]
    torch.manual_seed(0)
    pml_loss = make_pml().to(dtype)
    ours = GeneralizedMarginSoftmaxLoss.preset(name, NUM_CLASSES, DIM, scale=SCALE, **margin)
    ours = ours.to(dtype)
    with torch.no_grad():
        ours.W.copy_(pml_loss.W)
    return ours, pml_loss


def batch_with_wide_angles(W, dtype, unit_norm=False):
    """Random embeddings, a third of them pointing away from their class (θ near π)."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=generator)
    embeddings = torch.randn(BATCH, DIM, generator=generator, dtype=dtype) * 2
    away = slice(0, BATCH // 3)
    embeddings[away] = -W.detach()[:, labels[away]].t() + 0.05 * embeddings[away]
    if unit_norm:
        embeddings = torch.nn.functional.normalize(embeddings, dim=1)
    return embeddings, labels


def loss_and_grads(loss_fn, embeddings, labels):
    z = embeddings.clone().requires_grad_(True)
    loss = loss_fn(z, labels)
    grad_z, grad_w = torch.autograd.grad(loss, [z, loss_fn.W])
    return loss.detach(), grad_z, grad_w


def loss_and_grads_of(loss_fn, labels):
    """``(z, W) ↦ (loss, ∂/∂z, ∂/∂W)`` of ``loss_fn`` with its W replaced, in the inputs' dtype."""

    def evaluate(embeddings, W):
        z, w = embeddings.clone().requires_grad_(True), W.clone().requires_grad_(True)
        loss = torch.func.functional_call(loss_fn.to(W.dtype), {"W": w}, (z, labels))
        grad_z, grad_w = torch.autograd.grad(loss, (z, w))
        return loss.detach().reshape(1), grad_z, grad_w

    return evaluate


def assert_float32_within_conditioning(losses_by_name, embeddings, W, labels, skip=()):
    """Each loss in float32 is as close to the float64 value of the first as its conditioning allows.

    The float64 values of all of them agree to 1e-10 (the parity tests), so this compares float32
    with float64, not two rounded results with each other; see loss_utils.float32_tolerances.
    ``skip`` holds (name, part) pairs not compared.
    """
    reference = loss_and_grads_of(next(iter(losses_by_name.values())), labels)
    inputs = (embeddings.double(), W.double())
    expected = reference(*inputs)
    tolerances = float32_tolerances(reference, inputs)
    for name, loss_fn in losses_by_name.items():
        got = loss_and_grads_of(loss_fn, labels)(embeddings.float(), W.float())
        for part, value, target, tolerance in zip(
            ("loss", "grad z", "grad W"), got, expected, tolerances, strict=True
        ):
            if (name, part) in skip:
                continue
            error = float((value.double() - target).abs().max())
            assert error <= tolerance, (name, part, error, tolerance)
    return tolerances


@pytest.mark.parametrize("name", ["normface", "cosface", "arcface"])
def test_presets_match_pml_in_float64(name):
    ours, pml_loss = twin_losses(name, torch.float64)
    embeddings, labels = batch_with_wide_angles(ours.W, torch.float64)
    for mine, theirs in zip(
        loss_and_grads(ours, embeddings, labels),
        loss_and_grads(pml_loss, embeddings, labels),
        strict=True,
    ):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["normface", "cosface", "arcface"])
def test_presets_and_pml_in_float32_are_within_the_conditioning(name):
    ours, pml_loss = twin_losses(name, torch.float64)
    embeddings, labels = batch_with_wide_angles(ours.W, torch.float64)
    W = ours.W.detach()
    assert_float32_within_conditioning({"ours": ours, "pml": pml_loss}, embeddings, W, labels)


def test_arcface_fallback_region_is_exercised():
    ours, _ = twin_losses("arcface", torch.float64)
    embeddings, labels = batch_with_wide_angles(ours.W, torch.float64)
    cosines = torch.nn.functional.normalize(embeddings, dim=1) @ torch.nn.functional.normalize(
        ours.W.detach(), dim=0
    )
    angles = torch.acos(cosines.gather(1, labels[:, None]))
    assert bool((angles > math.pi - 0.6).any()) and bool((angles < math.pi - 0.6).any())


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-10)])
def test_sphereface_matches_pml_on_unit_norm_embeddings(dtype, tolerance):
    """PML's SphereFaceLoss scales the logits by s·‖x‖, the preset by s: they agree where
    ‖x‖ = 1, in the loss, W's gradient and the embeddings' gradient tangent to the sphere.
    PML's gradient also has a radial part (from ‖x‖), which the normalised loss does not."""
    ours, pml_loss = twin_losses("sphereface", dtype)
    embeddings, labels = batch_with_wide_angles(ours.W, dtype, unit_norm=True)
    loss, grad_z, grad_w = loss_and_grads(ours, embeddings, labels)
    pml_value, pml_grad_z, pml_grad_w = loss_and_grads(pml_loss, embeddings, labels)
    tangent = pml_grad_z - embeddings * (embeddings * pml_grad_z).sum(1, keepdim=True)
    torch.testing.assert_close(loss, pml_value, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(grad_w, pml_grad_w, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(grad_z, tangent, rtol=tolerance, atol=tolerance)
    assert float((pml_grad_z - tangent).abs().max()) > 1e-3  # where the definitions differ
    scaled = embeddings * 3
    assert not torch.allclose(ours(scaled, labels), pml_loss(scaled, labels))


def near_prototype_batch(W, spread):
    """Embeddings a small angle from their prototypes, as late in training; unit norm."""
    generator = torch.Generator().manual_seed(2)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=generator)
    noise = torch.randn(BATCH, DIM, generator=generator, dtype=W.dtype)
    unit_prototypes = torch.nn.functional.normalize(W.detach()[:, labels].t(), dim=1)
    return torch.nn.functional.normalize(unit_prototypes + spread * noise, dim=1), labels


@pytest.mark.parametrize(
    ("name", "margin", "spread"),
    [
        ("sphereface", 3, 1.0),
        ("sphereface", 4, 0.3),
        ("arcface", 1.5, 0.05),
        ("arcface", 0.6, 0.05),
    ],
)
def test_float32_error_follows_the_conditioning_for_ours_and_pml(name, margin, spread):
    """SphereFace m = 4 and ArcFace near m = π/2 on embeddings near their prototypes are badly
    conditioned (ψ's derivatives grow like 1/sin θ): there the float32 gradients of both this
    package and PML are further from their float64 values than 1e-5, and the tolerance says so."""
    make_pml = {
        "sphereface": lambda: pml_losses.SphereFaceLoss(
            NUM_CLASSES, DIM, margin=margin, scale=SCALE
        ),
        "arcface": lambda: pml_losses.ArcFaceLoss(
            NUM_CLASSES, DIM, margin=math.degrees(margin), scale=SCALE
        ),
    }[name]
    torch.manual_seed(0)
    pml_loss = make_pml().double()
    ours = GeneralizedMarginSoftmaxLoss.preset(name, NUM_CLASSES, DIM, scale=SCALE, margin=margin)
    ours = ours.double()
    W = pml_loss.W.detach().clone()
    embeddings, labels = near_prototype_batch(W, spread)
    # PML's SphereFace embedding gradient has a radial part ours has not (see above).
    skip = {("pml", "grad z")} if name == "sphereface" else set()
    tolerances = assert_float32_within_conditioning(
        {"ours": ours, "pml": pml_loss}, embeddings, W, labels, skip
    )
    if (name, margin) in (("sphereface", 4), ("arcface", 1.5)):
        assert max(tolerances[1:]) > 1e-5  # a blanket 1e-5 on the gradients would overclaim


def test_sphereface_float32_is_within_the_conditioning_on_unit_norm_embeddings():
    ours, pml_loss = twin_losses("sphereface", torch.float64)
    embeddings, labels = batch_with_wide_angles(ours.W, torch.float64, unit_norm=True)
    # On unit-norm embeddings the two agree in the loss and in W's gradient, not in the
    # embeddings' radial part (see above).
    assert_float32_within_conditioning(
        {"ours": ours, "pml": pml_loss}, embeddings, ours.W.detach(), labels, {("pml", "grad z")}
    )


@pytest.mark.parametrize(("m1", "m2", "m3"), [(1.0, 0.3, 0.2), (2.0, 0.0, 0.1), (1.5, 0.4, 0.0)])
def test_combined_margin_matches_the_formula_written_out(m1, m2, m3):
    def psi(theta):
        if m1 == 1.0:
            if theta <= math.pi - m2:
                return math.cos(theta + m2) - m3
            return math.cos(theta) - m2 * math.sin(m2) - m3
        k = math.floor((m1 * theta + m2) / math.pi)
        return (-1) ** k * math.cos(m1 * theta + m2) - 2 * k - m3

    loss_fn = GeneralizedMarginSoftmaxLoss(NUM_CLASSES, DIM, scale=SCALE, m1=m1, m2=m2, m3=m3)
    embeddings, labels = batch_with_wide_angles(loss_fn.W, torch.float32)

    def reference(z, w):
        return (torch.tensor(reference_gm_softmax(z, w, labels, SCALE, psi), dtype=torch.float64),)

    inputs = (embeddings.double(), loss_fn.W.detach().double())
    (expected,), (tolerance,) = reference(*inputs), float32_tolerances(reference, inputs)
    losses = unreduced_losses(loss_fn, embeddings, labels)
    assert float((losses.double() - expected).abs().max()) <= tolerance
    losses64 = unreduced_losses(loss_fn.double(), *inputs[:1], labels)
    torch.testing.assert_close(losses64, expected, rtol=1e-12, atol=1e-12)


def test_combined_margin_is_decreasing_in_the_angle():
    angles = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
    for m1, m2, m3 in [(1.0, 0.5, 0.0), (4.0, 0.0, 0.0), (1.7, 0.3, 0.1)]:
        values = combined_margin(torch.cos(angles), m1, m2, m3)
        assert bool((values.diff() <= 1e-12).all()), (m1, m2, m3)


@pytest.mark.parametrize("name", ["arcface", "sphereface", "cosface"])
def test_gradcheck_float64(name):
    loss_fn = GeneralizedMarginSoftmaxLoss.preset(name, 7, 5, scale=4.0).double()
    generator = torch.Generator().manual_seed(3)
    embeddings = torch.randn(6, 5, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 7, (6,), generator=generator)
    W = loss_fn.W.detach().clone().requires_grad_(True)

    def loss_of(z, weights):
        return torch.func.functional_call(loss_fn, {"W": weights}, (z, labels))

    assert torch.autograd.gradcheck(loss_of, (embeddings.requires_grad_(True), W))


def test_custom_phi_takes_the_autograd_path_and_agrees():
    fused = GeneralizedMarginSoftmaxLoss.preset("arcface", NUM_CLASSES, DIM, scale=SCALE).double()
    plain = GeneralizedMarginSoftmaxLoss.preset(
        "arcface", NUM_CLASSES, DIM, scale=SCALE, phi=lambda cosines: cosines
    ).double()
    plain.W.data.copy_(fused.W.data)
    embeddings, labels = batch_with_wide_angles(fused.W, torch.float64)
    for a, b in zip(
        loss_and_grads(fused, embeddings, labels),
        loss_and_grads(plain, embeddings, labels),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    shifted = GeneralizedMarginSoftmaxLoss(NUM_CLASSES, DIM, scale=SCALE, phi=lambda c: c + 0.1)
    shifted = shifted.double()
    shifted.W.data.copy_(fused.W.data)
    normface = GeneralizedMarginSoftmaxLoss(NUM_CLASSES, DIM, scale=SCALE).double()
    normface.W.data.copy_(fused.W.data)
    assert shifted(embeddings, labels).item() > normface(embeddings, labels).item()


def test_learnable_psi_gets_a_gradient():
    class LearnedShift(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.margin = torch.nn.Parameter(torch.tensor(0.2))

        def forward(self, cosines):
            return cosines - self.margin

    loss_fn = GeneralizedMarginSoftmaxLoss(NUM_CLASSES, DIM, psi=LearnedShift())
    assert any(p is loss_fn.psi.margin for p in loss_fn.parameters())
    embeddings, labels = batch_with_wide_angles(loss_fn.W, torch.float32)
    loss_fn(embeddings, labels).backward()
    assert loss_fn.psi.margin.grad is not None and float(loss_fn.psi.margin.grad) > 0


def test_collect_stats_on_both_paths():
    for phi in (None, lambda c: c):
        loss_fn = GeneralizedMarginSoftmaxLoss(NUM_CLASSES, DIM, phi=phi, collect_stats=True)
        embeddings, labels = batch_with_wide_angles(loss_fn.W, torch.float32)
        loss_fn(embeddings, labels)
        assert -2 <= loss_fn.min_sample_margin <= loss_fn.mean_sample_margin <= 2
        assert loss_fn.min_sample_margin < 0  # the samples pointing away
        margins = sample_margins(embeddings, labels, loss_fn.W.detach())
        assert loss_fn.mean_sample_margin == pytest.approx(float(margins.mean()), abs=1e-6)
        assert loss_fn.min_sample_margin == pytest.approx(float(margins.min()), abs=1e-6)


def test_preset_and_argument_errors():
    assert GeneralizedMarginSoftmaxLoss.preset_names() == [
        "arcface",
        "cosface",
        "normface",
        "sphereface",
    ]
    with pytest.raises(ValueError, match="unknown preset"):
        GeneralizedMarginSoftmaxLoss.preset("circleface", 4, 3)
    with pytest.raises(ValueError, match="no margin"):
        GeneralizedMarginSoftmaxLoss.preset("normface", 4, 3, margin=0.1)
    with pytest.raises(ValueError, match="either psi"):
        GeneralizedMarginSoftmaxLoss(4, 3, m2=0.5, psi=lambda c: c)
    with pytest.raises(ValueError, match="m2"):
        GeneralizedMarginSoftmaxLoss(4, 3, m2=4.0)
    with pytest.raises(ValueError, match="m1"):
        GeneralizedMarginSoftmaxLoss(4, 3, m1=0.0)
    with pytest.raises(TypeError, match="phi"):
        GeneralizedMarginSoftmaxLoss(4, 3, phi=3)
    loss_fn = GeneralizedMarginSoftmaxLoss.preset("arcface", 4, 3)
    assert (loss_fn.scale, loss_fn.m2) == (64.0, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        loss_fn(torch.randn(2, 3), torch.tensor([0, 4]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    loss_fn = GeneralizedMarginSoftmaxLoss.preset("cosface", 20, 8, scale=16.0)
    generator = torch.Generator().manual_seed(5)
    embeddings = torch.randn(64, 8, generator=generator)
    labels = torch.randint(0, 20, (64,), generator=generator)
    loss = loss_fn(embeddings.to(dtype), labels)
    assert loss.dtype == torch.float32 and loss_fn.W.dtype == torch.float32
    assert math.isfinite(float(loss))
    assert abs(float(loss) - loss_fn(embeddings, labels).item()) < 1e-2


PATHS = {"fused": None, "custom-phi": lambda cosines: cosines}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_empty_batch_gives_zero_loss_on_the_graph(path):
    loss_fn = GeneralizedMarginSoftmaxLoss.preset("arcface", 5, 3, phi=PATHS[path])
    embeddings = torch.zeros(0, 3, requires_grad=True)
    loss = loss_fn(embeddings, torch.zeros(0, dtype=torch.long))
    assert float(loss) == 0.0
    loss.backward()
    assert embeddings.grad is not None and float(loss_fn.W.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("path", sorted(PATHS))
def test_labels_and_embeddings_are_checked(path):
    loss_fn = GeneralizedMarginSoftmaxLoss.preset("cosface", 5, 2, phi=PATHS[path])
    embeddings = torch.randn(3, 2, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 4, 2])
    assert loss_fn(embeddings, labels.int()).item() == loss_fn(embeddings, labels).item()
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        loss_fn(embeddings, torch.tensor([0, -1, 2]))
    with pytest.raises(TypeError, match="int64 or int32"):
        loss_fn(embeddings, labels.to(torch.int16))
    with pytest.raises(ValueError, match="embeddings"):
        loss_fn(embeddings, labels[:2])
    with pytest.raises(ValueError, match="embedding_size=2"):
        loss_fn(torch.randn(3, 4), labels)
    for bad in (math.nan, math.inf):
        poisoned = embeddings.index_fill(0, torch.tensor([1]), bad)
        with pytest.raises(ValueError, match="NaN or Inf"):
            loss_fn(poisoned, labels)
    unchecked = GeneralizedMarginSoftmaxLoss.preset("cosface", 5, 2, validate_inputs=False)
    unchecked(embeddings.index_fill(0, torch.tensor([1]), math.nan), labels)  # no check, no error


@pytest.mark.parametrize("path", sorted(PATHS))
def test_cpu_autocast(path):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 8)
    loss_fn = GeneralizedMarginSoftmaxLoss.preset("arcface", 20, 8, scale=16.0, phi=PATHS[path])
    inputs, labels = torch.randn(32, 6), torch.randint(0, 20, (32,))
    reference = loss_fn(model(inputs), labels)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        embeddings = model(inputs)
        loss = loss_fn(embeddings, labels)
    loss.backward()
    assert embeddings.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert loss_fn.W.dtype == torch.float32 and loss_fn.W.grad.dtype == torch.float32
    assert torch.isfinite(loss_fn.W.grad).all()
    assert math.isfinite(float(loss)) and abs(float(loss) - float(reference)) < 1e-2


# --- cos θ = ±1: finite gradients in every dtype -----------------------------------------------

ANGULAR_MARGINS = {
    "arcface": {"m2": 0.5},
    "arcface-wide": {"m2": 1.5},
    "sphereface": {"m1": 4.0},
    "sphereface-non-integer": {"m1": 2.5},
    "combined": {"m1": 1.5, "m2": 0.3, "m3": 0.2},
    "integer-m1-with-m2": {"m1": 2.0, "m2": 0.3},
}
ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _plain_psi(cosines, m1=1.0, m2=0.0, m3=0.0):
    m1 = float(m1)
    """ψ written with torch.acos, autograd's own derivative (infinite at ±1)."""
    angles = torch.acos(cosines)
    if m1.is_integer() and m2 == 0.0:
        return (
            chebyshev_cosine_multiple(cosines, int(m1))
            * (-1) ** torch.floor(m1 * angles / math.pi).clamp(max=m1 - 1).detach()
            - 2 * torch.floor(m1 * angles / math.pi).clamp(max=m1 - 1)
            - m3
        )
    if m1 == 1.0:
        fallback = cosines - m2 * math.sin(m2)
        return torch.where(angles <= math.pi - m2, torch.cos(angles + m2), fallback) - m3
    shifted = m1 * angles + m2
    k = torch.floor(shifted / math.pi).clamp(max=math.ceil(m1 + m2 / math.pi) - 1).detach()
    return (1 - 2 * torch.remainder(k, 2)) * torch.cos(shifted) - 2 * k - m3


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("name", sorted(ANGULAR_MARGINS))
def test_margin_gradient_is_finite_at_plus_and_minus_one(name, dtype):
    margins = ANGULAR_MARGINS[name]
    cosines = torch.tensor([1.0, -1.0], dtype=dtype, requires_grad=True)
    values = combined_margin(cosines, **margins)
    values.sum().backward()
    assert torch.isfinite(values).all() and torch.isfinite(cosines.grad).all(), cosines.grad
    expected = _plain_psi(torch.tensor([1.0, -1.0], dtype=torch.float64), **margins)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(values.double(), expected, rtol=2 * eps, atol=4 * eps)


def test_gradient_at_plus_and_minus_one_is_finite_positive_and_the_angles_one_at_the_nearest_float():
    for dtype in ALL_DTYPES:
        inside = 1.0 - torch.finfo(dtype).eps / 2
        edges = torch.tensor([1.0, -1.0, 1.5, -1.5], dtype=dtype, requires_grad=True)
        angles_of(edges).sum().backward()
        neighbours = torch.tensor([inside, -inside], dtype=dtype, requires_grad=True)
        torch.acos(neighbours).sum().backward()
        assert torch.isfinite(neighbours.grad).all()
        torch.testing.assert_close(edges.grad, neighbours.grad.repeat(2), rtol=0, atol=0)
        for name, margins in ANGULAR_MARGINS.items():
            cosines = torch.tensor([1.0, -1.0], dtype=dtype, requires_grad=True)
            combined_margin(cosines, **margins).sum().backward()
            # ψ decreases in θ, so it increases in cos θ: the derivative is never negative at the
            # edges (0 for a non-integer m1 at θ = 0, where sin(m1·θ) = 0 meets the finite factor).
            assert bool((cosines.grad >= 0).all()), (name, dtype, cosines.grad)
            assert bool((cosines.grad > 0).any()), (name, dtype, cosines.grad)
    # ArcFace, exactly: dψ/dc = sin(m)/sqrt((1 − c*)(1 + c*)) at c = 1; the fallback's 1 at c = −1.
    edges = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
    combined_margin(edges, m2=0.5).sum().backward()
    inside = 1.0 - 2.0**-53
    expected = math.sin(0.5) / math.sqrt((1 - inside) * (1 + inside))
    assert edges.grad.tolist() == pytest.approx([expected, 1.0], rel=1e-12)
    # SphereFace m = 4: T_4'(±1) = ±16 on the piece inside [0, π], i.e. +16 at both ends.
    edges = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
    combined_margin(edges, m1=4.0).sum().backward()
    assert edges.grad.tolist() == [16.0, 16.0]


@pytest.mark.parametrize("name", sorted(ANGULAR_MARGINS))
def test_margin_values_and_gradients_are_unchanged_inside(name):
    margins = ANGULAR_MARGINS[name]
    generator = torch.Generator().manual_seed(11)
    inside = 1.0 - 2.0**-53
    cosines = torch.cat(
        [
            torch.rand(200, generator=generator, dtype=torch.float64) * 2 - 1,
            torch.tensor([inside, -inside, 0.0], dtype=torch.float64),
        ]
    )
    ours, plain = cosines.clone().requires_grad_(True), cosines.clone().requires_grad_(True)
    values = combined_margin(ours, **margins)
    reference = _plain_psi(plain, **margins)
    (values * torch.linspace(-1, 2, 203, dtype=torch.float64)).sum().backward()
    (reference * torch.linspace(-1, 2, 203, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(values, reference, rtol=0, atol=1e-15)
    torch.testing.assert_close(ours.grad, plain.grad, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", sorted(ANGULAR_MARGINS))
def test_margin_gradcheck_away_from_plus_and_minus_one(name):
    margins = ANGULAR_MARGINS[name]
    # Avoid the one jump of ψ, at θ = π − m2 when m1 = 1 (PML's fallback is discontinuous there).
    cosines = torch.tensor([0.97, 0.6, 0.1, -0.35, -0.8, -0.97], dtype=torch.float64)
    if margins.get("m1", 1.0) == 1.0:
        jump = math.cos(math.pi - margins["m2"])
        cosines = cosines[(cosines - jump).abs() > 0.05]
    assert torch.autograd.gradcheck(
        lambda c: combined_margin(c, **margins), (cosines.requires_grad_(True),)
    )


def _axis_prototypes(dtype=torch.float32):
    """Prototypes along ±axes with integer lengths: cosines of ±1 are exact in every dtype."""
    W = torch.zeros(DIM, NUM_CLASSES, dtype=dtype)
    for j in range(NUM_CLASSES):
        W[j % DIM, j] = (1 + j % 3) * (1 if j < DIM else -1)
    return W


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("name", sorted(ANGULAR_MARGINS))
def test_loss_gradients_are_finite_for_embeddings_on_and_against_their_prototypes(name, dtype):
    loss_fn = GeneralizedMarginSoftmaxLoss(NUM_CLASSES, DIM, scale=SCALE, **ANGULAR_MARGINS[name])
    with torch.no_grad():
        loss_fn.W.copy_(_axis_prototypes())
    labels = torch.tensor([0, 1, 2, 3])
    directions = loss_fn.W.detach()[:, labels].t() * torch.tensor([[1.0], [2.0], [-1.0], [-3.0]])
    embeddings = directions.to(dtype).requires_grad_(True)
    cosines = cosine_logits(embeddings.detach().float(), loss_fn.W.detach())
    assert cosines.gather(1, labels[:, None]).squeeze(1).tolist() == [1.0, 1.0, -1.0, -1.0]
    loss = loss_fn(embeddings, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(embeddings.grad).all()
    assert torch.isfinite(loss_fn.W.grad).all()


@pytest.mark.parametrize("name", sorted(ANGULAR_MARGINS))
@pytest.mark.parametrize("path", sorted(PATHS))
def test_loss_gradients_are_finite_when_an_embedding_is_its_random_prototype(name, path):
    """The issue's case: float32, x = W[:, :2].T, labels [0, 1]; also −x and under autocast."""
    loss_fn = GeneralizedMarginSoftmaxLoss(
        NUM_CLASSES, DIM, scale=SCALE, phi=PATHS[path], **ANGULAR_MARGINS[name]
    )
    for sign, autocast in ((1.0, False), (-1.0, False), (1.0, True)):
        loss_fn.zero_grad()
        embeddings = (sign * loss_fn.W.detach()[:, :2].t()).clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(embeddings, torch.tensor([0, 1]))
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(embeddings.grad).all(), (sign, autocast)
        assert torch.isfinite(loss_fn.W.grad).all(), (sign, autocast)


def test_psi_at_the_fallback_threshold_takes_cos_theta_plus_m():
    # θ exactly π − m: PML's rule (angles <= π − m) gives cos(θ + m) = −1, not the fallback.
    theta = math.acos(-0.5)
    margin = math.pi - theta
    assert math.pi - margin == theta  # exactly on the threshold in float64
    value = combined_margin(torch.tensor([-0.5], dtype=torch.float64), m2=margin)
    assert float(value) == pytest.approx(math.cos(theta + margin), abs=1e-15)
    assert float(value) != pytest.approx(-0.5 - margin * math.sin(margin), abs=1e-3)


def test_cosines_rounded_past_one_are_clamped():
    # 1 + ulp in float32 is the angle 0 (ψ = cos m), not a NaN angle sent to the fallback.
    past_one = torch.tensor([1.0 + 2.0**-23, -1.0 - 2.0**-23], requires_grad=True)
    values = combined_margin(past_one, m2=0.5)
    assert values.tolist() == pytest.approx([math.cos(0.5), -1.0 - 0.5 * math.sin(0.5)], abs=1e-6)
    values.sum().backward()
    assert torch.isfinite(past_one.grad).all()
    sphere = combined_margin(past_one.detach(), m1=2.5)
    assert sphere.tolist() == pytest.approx([1.0, math.cos(2.5 * math.pi) - 2 * 2], abs=1e-5)


# --- zero prototype columns: cosine 0 everywhere -------------------------------------------------


def _arcface_psi(theta, margin=0.5):
    if theta <= math.pi - margin:
        return math.cos(theta + margin)
    return math.cos(theta) - margin * math.sin(margin)


@pytest.mark.parametrize("loss_class", ["lm", "gm-fused", "gm-custom-phi"])
def test_zero_prototype_column_is_cosine_zero_in_every_path(loss_class):
    from pml_largest_margin.losses import LargestMarginSoftmaxLoss

    if loss_class == "lm":
        loss_fn = LargestMarginSoftmaxLoss(NUM_CLASSES, DIM, scale=SCALE, collect_stats=True)
    else:
        phi = None if loss_class == "gm-fused" else (lambda c: c)
        loss_fn = GeneralizedMarginSoftmaxLoss.preset(
            "arcface", NUM_CLASSES, DIM, scale=SCALE, phi=phi, collect_stats=True
        )
    loss_fn = loss_fn.double()
    with torch.no_grad():
        loss_fn.W[:, 3] = 0.0
    embeddings, labels = batch_with_wide_angles(loss_fn.W, torch.float64)
    labels[:2] = 3
    logits = loss_fn.get_logits(embeddings)
    assert torch.isfinite(logits).all() and bool((logits[:, 3] == 0).all())
    losses = unreduced_losses(loss_fn, embeddings, labels)
    W = loss_fn.W.detach()
    if loss_class == "lm":
        expected = reference_lm_softmax(embeddings, W, labels, SCALE)
    else:
        expected = reference_gm_softmax(embeddings, W, labels, SCALE, _arcface_psi)
    assert losses.tolist() == pytest.approx(expected, rel=1e-10, abs=1e-10)
    loss_fn(embeddings.requires_grad_(True), labels).backward()
    assert torch.isfinite(embeddings.grad).all() and torch.isfinite(loss_fn.W.grad).all()
    assert loss_fn.class_margin_degrees == pytest.approx(class_margin(loss_fn.W).degrees)
    margins = sample_margins(embeddings.detach(), labels, loss_fn.W.detach())
    assert loss_fn.min_sample_margin == pytest.approx(float(margins.min()), abs=1e-12)


def test_arccos_gradient_is_exact_up_to_its_cap():
    from pml_largest_margin.losses._angles import arccos

    # 1 − c² from 1e-10 to 0.75: the exact −1/sin θ; at |c| = 1 (and where 1 − c² < 1e-12) the
    # derivative is capped at 1e6 in magnitude.
    gaps = torch.tensor([1e-10, 1e-8, 1e-4, 0.75], dtype=torch.float64)
    cosines = torch.cat([(1 - gaps).sqrt(), -(1 - gaps).sqrt(), torch.tensor([1.0, -1.0])])
    cosines.requires_grad_(True)
    arccos(cosines).sum().backward()
    capped = torch.tensor([-1e6, -1e6], dtype=torch.float64)
    expected = torch.cat([-(1 / gaps.sqrt()).repeat(2), capped])
    torch.testing.assert_close(cosines.grad, expected, rtol=1e-6, atol=0)


def test_float32_embeddings_with_float64_prototypes_compute_in_float64():
    generator = torch.Generator().manual_seed(9)
    loss_fn = LargestMarginSoftmaxLoss(num_classes=5, embedding_size=4).double()
    embeddings = torch.randn(6, 4, generator=generator)
    labels = torch.randint(0, 5, (6,), generator=generator)
    loss = loss_fn(embeddings, labels)
    assert loss.dtype == torch.float64
    assert float(loss) == float(loss_fn(embeddings.double(), labels))
