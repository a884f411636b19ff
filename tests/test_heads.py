"""The adaptive-margin heads against their published formulas, written out plainly (float64)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from loss_utils import reference_cosines

from pml_largest_margin.losses import (
    AdaCosLoss,
    AdaFaceLoss,
    CurricularFaceLoss,
    DynamicMarginLoss,
    ElasticFaceLoss,
    GeneralizedMarginSoftmaxLoss,
    MagFaceLoss,
)

NUM_CLASSES, DIM, BATCH = 9, 6, 14
COUNTS = [1, 2, 3, 5, 8, 13, 21, 400, 10_000]


def problem(dtype=torch.float64):
    """W, labels, and embeddings with norms from ~1 to ~150; a few point away from their class
    (θ beyond π − m, ArcFace's continuation) and one sits near its class (θ small)."""
    generator = torch.Generator().manual_seed(3)
    W = torch.randn(DIM, NUM_CLASSES, generator=generator, dtype=dtype)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=generator)
    directions = torch.randn(BATCH, DIM, generator=generator, dtype=dtype)
    unit_w = W / W.norm(dim=0)
    directions[:3] = -unit_w[:, labels[:3]].t() + 0.1 * directions[:3]
    directions[3] = unit_w[:, labels[3]] + 0.02 * directions[3]
    directions = directions / directions.norm(dim=1, keepdim=True)
    norms = torch.logspace(0, math.log10(150), BATCH, dtype=dtype)
    return directions * norms[:, None], labels, W


def softmax_cross_entropy(cosines, labels, target_logits, scale):
    """Mean of −log softmax(s·logits)_y with the target logit replaced by ψ_i."""
    logits = cosines.scatter(1, labels[:, None], target_logits[:, None])
    return F.cross_entropy(scale * logits, labels)


def arcface(target, margins, fallback=True):
    """cos(θ + m); insightface's cos θ − m·sin m where θ > π − m."""
    theta = torch.acos(target)
    if not fallback:
        return torch.cos(theta + margins)
    return torch.where(theta <= math.pi - margins, torch.cos(theta + margins),
                       target - margins * torch.sin(margins))  # fmt: skip


def reference_adaface(embeddings, W, labels, m=0.4, h=0.333, s=64.0, eps=1e-3, stats=None):
    cosines = reference_cosines(embeddings, W)
    norms = embeddings.norm(dim=1).clamp(0.001, 100).detach()
    mean, std = (norms.mean(), norms.std()) if stats is None else stats
    g = torch.clamp(h * (norms - mean) / (std + eps), -1, 1)
    theta = torch.acos(cosines.gather(1, labels[:, None])[:, 0].clamp(-1 + eps, 1 - eps))
    target = torch.cos(torch.clamp(theta - m * g, eps, math.pi - eps)) - (m + m * g)
    return softmax_cross_entropy(cosines, labels, target, s)


def reference_magface(embeddings, W, labels, s=64.0, la=10.0, ua=110.0, lm=0.45, um=0.8, lg=35.0):
    cosines = reference_cosines(embeddings, W)
    a = embeddings.norm(dim=1).clamp(la, ua)
    margins = (um - lm) / (ua - la) * (a - la) + lm
    target = arcface(cosines.gather(1, labels[:, None])[:, 0], margins)
    g = a / ua**2 + 1 / a
    return softmax_cross_entropy(cosines, labels, target, s) + lg * g.mean()


def reference_elastic(embeddings, W, labels, margins, variant, s=64.0):
    cosines = reference_cosines(embeddings, W)
    target = cosines.gather(1, labels[:, None])[:, 0]
    psi = target - margins if variant == "cos" else arcface(target, margins, fallback=False)
    return softmax_cross_entropy(cosines, labels, psi, s)


def reference_dynamic(embeddings, W, labels, counts, a=0.5, lam=0.25, b=0.05, s=64.0):
    cosines = reference_cosines(embeddings, W)
    margins = a * torch.tensor(counts, dtype=W.dtype) ** (-lam) + b
    target = arcface(cosines.gather(1, labels[:, None])[:, 0], margins[labels])
    return softmax_cross_entropy(cosines, labels, target, s)


def reference_adacos_scale(embeddings, W, labels, old_scale):
    with torch.no_grad():
        cosines = reference_cosines(embeddings, W)
        others = torch.exp(old_scale * cosines).scatter(1, labels[:, None], 0.0)
        b_avg = others.sum() / len(labels)
        theta_med = torch.median(torch.acos(cosines.gather(1, labels[:, None])[:, 0]))
        return float(torch.log(b_avg) / torch.cos(torch.clamp(theta_med, max=math.pi / 4)))


def reference_curricular(embeddings, W, labels, hardness, m=0.5, s=64.0, update=True):
    """The reference's steps: clamp, cos(θ+m), hard-negative mask, T updated first, modulate."""
    cosines = reference_cosines(embeddings, W).clamp(-1, 1)
    target = cosines.gather(1, labels[:, None])
    if update:
        with torch.no_grad():
            hardness = 0.01 * target.mean() + 0.99 * hardness
    cos_theta_m = torch.cos(torch.acos(target) + m)
    hard = (cosines > cos_theta_m).detach()
    final_target = torch.where(target > math.cos(math.pi - m), cos_theta_m,
                               target - m * math.sin(math.pi - m))  # fmt: skip
    logits = torch.where(hard, cosines * (hardness + cosines), cosines)
    logits = logits.scatter(1, labels[:, None], final_target)
    return F.cross_entropy(s * logits, labels), hard, hardness


def grads(loss_fn, embeddings, labels):
    z = embeddings.clone().requires_grad_(True)
    loss = loss_fn(z, labels)
    grad_z, grad_w = torch.autograd.grad(loss, [z, loss_fn.W])
    return loss.detach(), grad_z, grad_w


def reference_grads(formula, embeddings, W, labels):
    z = embeddings.clone().requires_grad_(True)
    w = W.clone().requires_grad_(True)
    loss = formula(z, w, labels)
    grad_z, grad_w = torch.autograd.grad(loss, [z, w])
    return loss.detach(), grad_z, grad_w


def head(loss_class, W, **kwargs):
    loss_fn = loss_class(NUM_CLASSES, DIM, **kwargs).double()
    with torch.no_grad():
        loss_fn.W.copy_(W)
    return loss_fn


def assert_parity(loss_fn, formula, embeddings, W, labels, tol=1e-10):
    ours = grads(loss_fn, embeddings, labels)
    expected = reference_grads(formula, embeddings, W, labels)
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


# --- parity with the formulas ------------------------------------------------------------------


@pytest.mark.parametrize("h", [0.333, 3.0])  # 3.0: most margin scalers clip at ±1
def test_adaface_matches_formula(h):
    embeddings, labels, W = problem()
    assert_parity(head(AdaFaceLoss, W, h=h), lambda z, w, y: reference_adaface(z, w, y, h=h),
                  embeddings, W, labels)  # fmt: skip


def test_adaface_running_statistics_blend_freeze_and_persist():
    embeddings, labels, W = problem()
    loss_fn = head(AdaFaceLoss, W, t_alpha=0.25)
    norms = embeddings.norm(dim=1).clamp(0.001, 100)
    mean = 0.25 * norms.mean() + 0.75 * 20.0
    std = 0.25 * norms.std() + 0.75 * 100.0
    assert_parity(loss_fn, lambda z, w, y: reference_adaface(z, w, y, stats=(mean, std)),
                  embeddings, W, labels)  # fmt: skip
    torch.testing.assert_close(loss_fn.running_norm_mean, mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(loss_fn.running_norm_std, std, atol=1e-12, rtol=0)
    state = loss_fn.state_dict()
    assert {"running_norm_mean", "running_norm_std"} <= set(state)
    loss_fn.eval()
    other = embeddings[:5] * 3
    assert_parity(loss_fn, lambda z, w, y: reference_adaface(z, w, y, stats=(mean, std)),
                  other, W, labels[:5])  # fmt: skip
    assert float(loss_fn.running_norm_mean) == pytest.approx(float(mean), abs=1e-12)
    restored = head(AdaFaceLoss, W, t_alpha=0.25)
    restored.load_state_dict(state)
    assert float(restored.running_norm_std) == float(std)


def test_magface_matches_formula():
    embeddings, labels, W = problem()
    assert_parity(head(MagFaceLoss, W), reference_magface, embeddings, W, labels)


@pytest.mark.parametrize("variant", ["arc", "cos"])
def test_elastic_face_matches_formula_with_the_generators_draws(variant):
    embeddings, labels, W = problem()
    loss_fn = head(ElasticFaceLoss, W, variant=variant,
                   generator=torch.Generator().manual_seed(5))  # fmt: skip
    m = 0.5 if variant == "arc" else 0.35
    noise = torch.randn(BATCH, generator=torch.Generator().manual_seed(5)).double()
    draws = m + 0.0125 * noise
    assert draws.std() > 0.005
    assert_parity(loss_fn, lambda z, w, y: reference_elastic(z, w, y, draws, variant),
                  embeddings, W, labels)  # fmt: skip
    loss_fn.eval()  # the mean margin
    mean_margins = torch.full((BATCH,), m, dtype=torch.float64)
    assert_parity(loss_fn, lambda z, w, y: reference_elastic(z, w, y, mean_margins, variant),
                  embeddings, W, labels)  # fmt: skip


def test_elastic_face_is_reproducible_and_redraws_each_call():
    embeddings, labels, W = problem()
    values = []
    for _ in range(2):
        loss_fn = head(ElasticFaceLoss, W, generator=torch.Generator().manual_seed(7))
        values.append([loss_fn(embeddings, labels).item() for _ in range(2)])
    assert values[0] == values[1]
    assert values[0][0] != values[0][1]


def test_dynamic_margin_matches_formula():
    embeddings, labels, W = problem()
    loss_fn = head(DynamicMarginLoss, W, class_counts=COUNTS)
    expected = 0.5 * torch.tensor(COUNTS, dtype=torch.float64) ** -0.25 + 0.05
    torch.testing.assert_close(loss_fn.class_margins, expected, atol=1e-15, rtol=0)
    assert_parity(loss_fn, lambda z, w, y: reference_dynamic(z, w, y, COUNTS),
                  embeddings, W, labels)  # fmt: skip


def test_adacos_fixed_matches_formula():
    embeddings, labels, W = problem()
    scale = math.sqrt(2) * math.log(NUM_CLASSES - 1)
    loss_fn = head(AdaCosLoss, W, dynamic=False)
    assert_parity(loss_fn, lambda z, w, y: F.cross_entropy(scale * reference_cosines(z, w), y),
                  embeddings, W, labels)  # fmt: skip
    assert float(loss_fn.running_scale) == scale


def test_adacos_dynamic_updates_the_scale_before_the_loss_and_freezes_in_eval():
    embeddings, labels, W = problem()
    loss_fn = head(AdaCosLoss, W)
    scale = math.sqrt(2) * math.log(NUM_CLASSES - 1)
    for batch in (slice(0, 8), slice(4, 14)):  # the second batch has an even size: lower median
        scale = reference_adacos_scale(embeddings[batch], W, labels[batch], scale)
        assert_parity(loss_fn, lambda z, w, y, s=scale: F.cross_entropy(s * reference_cosines(z, w), y),
                      embeddings[batch], W, labels[batch])  # fmt: skip
        assert float(loss_fn.running_scale) == pytest.approx(scale, abs=1e-12)
    loss_fn.eval()
    assert_parity(loss_fn, lambda z, w, y: F.cross_entropy(scale * reference_cosines(z, w), y),
                  embeddings[:3], W, labels[:3])  # fmt: skip
    assert float(loss_fn.running_scale) == pytest.approx(scale, abs=1e-12)
    torch.testing.assert_close(
        loss_fn.get_logits(embeddings), scale * reference_cosines(embeddings, W)
    )


@pytest.mark.parametrize(
    "block_elements", [2**22, 2 * NUM_CLASSES + 1]
)  # one block; blocks of 2 rows
def test_curricular_face_matches_formula_over_steps(monkeypatch, block_elements):
    from pml_largest_margin.losses import curricular_face_loss

    monkeypatch.setattr(curricular_face_loss, "_BLOCK_ELEMENTS", block_elements)
    embeddings, labels, W = problem()
    loss_fn = head(CurricularFaceLoss, W)
    hardness = torch.tensor(0.0, dtype=torch.float64)
    batches = (slice(0, BATCH), slice(2, 11), slice(0, BATCH))
    for step, batch in enumerate(batches):
        z, y = embeddings[batch] * (1 + step), labels[batch]
        _, hard, next_hardness = reference_curricular(z, W, y, hardness)
        non_target_hard = hard & ~F.one_hot(y, NUM_CLASSES).bool()
        assert non_target_hard.any() and not non_target_hard.all()
        assert_parity(loss_fn, lambda z, w, y, h=hardness: reference_curricular(z, w, y, h)[0],
                      z, W, y)  # fmt: skip
        hardness = next_hardness
        assert float(loss_fn.running_hardness) == pytest.approx(float(hardness), abs=1e-14)
    assert float(hardness) != 0.0
    loss_fn.eval()
    frozen = float(loss_fn.running_hardness)
    assert_parity(loss_fn, lambda z, w, y: reference_curricular(z, w, y, frozen, update=False)[0],
                  embeddings, W, labels)  # fmt: skip
    assert float(loss_fn.running_hardness) == frozen


# --- the heads that are GM-Softmax settings equal the GM class ---------------------------------


def gm(W, preset, **kwargs):
    loss_fn = GeneralizedMarginSoftmaxLoss.preset(preset, NUM_CLASSES, DIM, **kwargs).double()
    with torch.no_grad():
        loss_fn.W.copy_(W)
    return loss_fn


@pytest.mark.parametrize(
    "make_head, make_gm",
    [
        (lambda W: head(AdaCosLoss, W, dynamic=False),
         lambda W: gm(W, "normface", scale=math.sqrt(2) * math.log(NUM_CLASSES - 1))),
        (lambda W: head(ElasticFaceLoss, W, variant="cos", std=0.0),
         lambda W: gm(W, "cosface", scale=64.0, margin=0.35)),
        (lambda W: head(DynamicMarginLoss, W, class_counts=[16] * NUM_CLASSES),
         lambda W: gm(W, "arcface", scale=64.0, margin=0.5 / 2 + 0.05)),
        (lambda W: head(MagFaceLoss, W, lower_margin=0.5, upper_margin=0.5, lambda_g=0.0),
         lambda W: gm(W, "arcface", scale=64.0, margin=0.5)),
    ],
    ids=["adacos-fixed=normface", "elastic-cos-std0=cosface", "dynamic-equal=arcface",
         "magface-constant=arcface"],
)  # fmt: skip
def test_gm_softmax_settings_equal_the_gm_class(make_head, make_gm):
    embeddings, labels, W = problem()
    for got, want in zip(grads(make_head(W), embeddings, labels),
                         grads(make_gm(W), embeddings, labels), strict=True):  # fmt: skip
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


# --- cos = ±1, half precision, autocast --------------------------------------------------------

HEADS = {
    "adaface": lambda: AdaFaceLoss(NUM_CLASSES, DIM),
    "magface": lambda: MagFaceLoss(NUM_CLASSES, DIM),
    "elastic-arc": lambda: ElasticFaceLoss(NUM_CLASSES, DIM, generator=torch.Generator().manual_seed(0)),
    "elastic-cos": lambda: ElasticFaceLoss(NUM_CLASSES, DIM, variant="cos"),
    "adacos": lambda: AdaCosLoss(NUM_CLASSES, DIM),
    "dynamic": lambda: DynamicMarginLoss(NUM_CLASSES, DIM, class_counts=COUNTS),
    "curricular": lambda: CurricularFaceLoss(NUM_CLASSES, DIM),
}  # fmt: skip


def aligned_batch(W):
    """Rows exactly along (cos = 1) and against (cos = −1) their class prototype, norms 5..60."""
    labels = torch.arange(8) % NUM_CLASSES
    signs = torch.tensor([1.0, -1.0] * 4)
    norms = torch.linspace(5, 60, 8)
    return (W.detach()[:, labels].t() * (signs * norms)[:, None]), labels


@pytest.mark.parametrize("name", sorted(HEADS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_finite_gradients_at_cos_plus_minus_one(name, dtype):
    torch.manual_seed(0)
    loss_fn = HEADS[name]()
    if dtype == torch.float64:
        loss_fn = loss_fn.double()
    embeddings, labels = aligned_batch(loss_fn.W)
    z = embeddings.to(dtype).requires_grad_(True)
    loss = loss_fn(z, labels)
    loss.backward()
    assert loss_fn.W.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(loss) and z.grad.dtype == dtype
    assert torch.isfinite(z.grad).all() and torch.isfinite(loss_fn.W.grad).all()
    assert loss_fn.W.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(HEADS))
def test_cpu_autocast_computes_in_float32(name):
    torch.manual_seed(0)
    reference_fn, loss_fn = HEADS[name](), HEADS[name]()
    loss_fn.load_state_dict(reference_fn.state_dict())
    embeddings, labels, _ = problem(torch.float32)
    embeddings = embeddings.to(torch.bfloat16).float()
    expected = reference_fn(embeddings, labels)
    z = embeddings.clone().requires_grad_(True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = loss_fn(z @ torch.eye(DIM), labels)  # a bfloat16 matmul output
    loss.backward()
    assert loss.dtype == torch.float32 and loss_fn.W.dtype == torch.float32
    assert torch.isfinite(z.grad).all()
    assert float(loss) == pytest.approx(float(expected), rel=2e-2)


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: AdaFaceLoss(NUM_CLASSES, DIM, margin=-0.1), "margin"),
        (lambda: AdaFaceLoss(NUM_CLASSES, DIM, h=float("nan")), "h must"),
        (lambda: AdaFaceLoss(NUM_CLASSES, DIM, t_alpha=0.0), "t_alpha"),
        (lambda: AdaFaceLoss(NUM_CLASSES, DIM, eps=0.0), "eps"),
        (lambda: MagFaceLoss(NUM_CLASSES, DIM, lower_norm=110.0), "lower_norm"),
        (lambda: MagFaceLoss(NUM_CLASSES, DIM, lower_margin=0.9), "lower_margin"),
        (lambda: MagFaceLoss(NUM_CLASSES, DIM, lambda_g=-1.0), "lambda_g"),
        (lambda: ElasticFaceLoss(NUM_CLASSES, DIM, variant="sphere"), "variant"),
        (lambda: ElasticFaceLoss(NUM_CLASSES, DIM, std=-0.1), "std"),
        (lambda: ElasticFaceLoss(NUM_CLASSES, DIM, margin=4.0), "margin"),
        (lambda: AdaCosLoss(2, DIM), "num_classes >= 3"),
        (lambda: AdaCosLoss(NUM_CLASSES, DIM, scale=3.0), "scale"),
        (lambda: DynamicMarginLoss(NUM_CLASSES, DIM, class_counts=[1, 2]), "one count per class"),
        (lambda: DynamicMarginLoss(NUM_CLASSES, DIM, class_counts=[0] * NUM_CLASSES), "> 0"),
        (lambda: DynamicMarginLoss(NUM_CLASSES, DIM, class_counts=COUNTS, b=-1.0), r"\[0, π\)"),
        (lambda: MagFaceLoss(NUM_CLASSES, DIM, scale=0.0), "scale"),
        (lambda: CurricularFaceLoss(NUM_CLASSES, DIM, margin=-1.0), "margin"),
        (
            lambda: CurricularFaceLoss(NUM_CLASSES, DIM, sample_margin_regularizer=lambda *a: 0),
            "sample_margin_regularizer",
        ),
    ],
)
def test_bad_arguments_raise_value_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_bad_generator_type_and_missing_process_group():
    with pytest.raises(TypeError, match="generator"):
        ElasticFaceLoss(NUM_CLASSES, DIM, generator=5)
    with pytest.raises(RuntimeError, match="not initialised"):
        AdaFaceLoss(NUM_CLASSES, DIM, process_group=object())


@pytest.mark.parametrize("name", sorted(HEADS))
def test_bad_batches_raise_value_error(name):
    loss_fn = HEADS[name]()
    embeddings = torch.randn(4, DIM)
    with pytest.raises(ValueError, match="labels"):
        loss_fn(embeddings, torch.tensor([0, 1, 2, NUM_CLASSES]))
    with pytest.raises(ValueError, match="NaN"):
        loss_fn(
            embeddings.index_fill(0, torch.tensor([1]), math.nan), torch.zeros(4, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="dimension"):
        loss_fn(torch.randn(4, DIM + 1), torch.zeros(4, dtype=torch.long))


def test_adaface_needs_two_samples_in_training_but_not_in_eval():
    loss_fn = AdaFaceLoss(NUM_CLASSES, DIM)
    with pytest.raises(ValueError, match="at least 2 samples"):
        loss_fn(torch.randn(1, DIM), torch.tensor([0]))
    loss_fn.eval()
    assert torch.isfinite(loss_fn(torch.randn(1, DIM), torch.tensor([0])))


@pytest.mark.parametrize("name", sorted(HEADS))
def test_empty_batch_gives_zero_loss_and_leaves_state(name):
    loss_fn = HEADS[name]()
    before = {key: value.clone() for key, value in loss_fn.state_dict().items()}
    z = torch.randn(0, DIM, requires_grad=True)
    loss = loss_fn(z, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert float(loss) == 0.0
    for key, value in loss_fn.state_dict().items():
        assert torch.equal(value, before[key])


# --- the loss factory behind pml-lm train and demo ---------------------------------------------


@pytest.mark.parametrize(
    "name, loss_class, settings",
    [
        ("adaface", AdaFaceLoss, {"margin": 0.4, "scale": 10.0}),
        ("magface", MagFaceLoss, {"scale": 10.0, "lambda_g": 35.0}),
        ("curricularface", CurricularFaceLoss, {"margin": 0.5, "scale": 10.0}),
        ("elasticface-arc", ElasticFaceLoss, {"variant": "arc", "margin": 0.5}),
        ("elasticface-cos", ElasticFaceLoss, {"variant": "cos", "margin": 0.35}),
        ("adacos", AdaCosLoss, {"dynamic": True, "scale": math.sqrt(2) * math.log(8)}),
        ("adacos-fixed", AdaCosLoss, {"dynamic": False}),
        ("dynamic-margin", DynamicMarginLoss, {"scale": 10.0}),
    ],
)
def test_loss_factory_builds_every_head(name, loss_class, settings):
    from pml_largest_margin.training.loss_factory import LOSS_NAMES, build_loss

    assert name in LOSS_NAMES
    loss_fn = build_loss(name, NUM_CLASSES, DIM, scale=10.0, class_counts=COUNTS)
    assert type(loss_fn) is loss_class
    for key, value in settings.items():
        assert getattr(loss_fn, key) == pytest.approx(value)
    if name == "dynamic-margin":
        expected = 0.5 * torch.tensor(COUNTS, dtype=torch.float64) ** -0.25 + 0.05
        torch.testing.assert_close(loss_fn.class_margins, expected)
        with pytest.raises(ValueError, match="class_counts"):
            build_loss(name, NUM_CLASSES, DIM)
    if "margin" in settings:
        assert build_loss(name, NUM_CLASSES, DIM, margin=0.2).margin == pytest.approx(0.2)


# --- memory= and the capability flags ----------------------------------------------------------


@pytest.mark.parametrize("memory", ["stream", "auto"])
def test_curricular_face_stream_keeps_its_graph_for_a_second_backward(memory, monkeypatch):
    from pml_largest_margin.losses import curricular_face_loss, fused

    monkeypatch.setattr(curricular_face_loss, "stream_block_columns", lambda *args: 2)
    embeddings, labels, W = problem()
    # "auto" keeps its last 3 blocks' cosines, "stream" its last one; backward only reads them.
    monkeypatch.setattr(fused, "BUFFER_LIMIT_BYTES", 3 * len(labels) * 2 * 8)
    loss_fn = CurricularFaceLoss(NUM_CLASSES, DIM, memory=memory).double()
    with torch.no_grad():
        loss_fn.W.copy_(W)
    z = embeddings.clone().requires_grad_(True)
    loss = loss_fn(z, labels)
    first = torch.autograd.grad(loss, [z, loss_fn.W], retain_graph=True)
    second = torch.autograd.grad(loss, [z, loss_fn.W])
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_honours_memory_stream_with_equal_values_and_gradients(name, monkeypatch):
    from pml_largest_margin.losses import curricular_face_loss, fused

    streamed = []

    def two_columns(num_rows, device, dtype=None):
        streamed.append(num_rows)
        return 2

    monkeypatch.setattr(fused, "stream_block_columns", two_columns)
    monkeypatch.setattr(curricular_face_loss, "stream_block_columns", two_columns)
    embeddings, labels, W = problem()
    # "auto" streams too, keeping its last 2 blocks (of 2 columns, float64).
    monkeypatch.setattr(fused, "BUFFER_LIMIT_BYTES", 2 * len(labels) * 2 * 8)
    assert fused.uses_stream("auto", len(labels), NUM_CLASSES, torch.float64)
    results = {}
    for memory in ("buffer", "stream", "auto"):
        torch.manual_seed(0)
        loss_fn = HEADS[name]().double()
        assert loss_fn.supports_stream
        loss_fn.memory = memory
        with torch.no_grad():
            loss_fn.W.copy_(W)
        before = len(streamed)
        results[memory] = [grads(loss_fn, embeddings * (1 + step), labels) for step in range(2)]
        assert (len(streamed) > before) == (memory != "buffer")
        results[memory].append({key: value.clone() for key, value in loss_fn.state_dict().items()})
    for memory in ("stream", "auto"):
        for got, want in zip(results[memory][:2], results["buffer"][:2], strict=True):
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
        for key, value in results["buffer"][2].items():
            torch.testing.assert_close(results[memory][2][key], value, atol=1e-12, rtol=1e-12)


def test_capability_flags_refuse_what_a_head_does_not_support():
    assert not CurricularFaceLoss.supports_sample_margin_regularizer
    assert AdaFaceLoss.supports_sample_margin_regularizer and AdaFaceLoss.supports_stream
    assert (
        not AdaFaceLoss.supports_sub_centers and GeneralizedMarginSoftmaxLoss.supports_sub_centers
    )
    with pytest.raises(ValueError, match="memory='stream'"):
        GeneralizedMarginSoftmaxLoss(NUM_CLASSES, DIM, phi=torch.cos, memory="stream")
    with pytest.warns(DeprecationWarning, match="supports_class_parallel"):
        assert CurricularFaceLoss(NUM_CLASSES, DIM).supports_class_parallel


def test_curricular_face_hardness_survives_a_checkpoint_exactly():
    # The running hardness is kept in float64 from construction, so loading a checkpoint into a
    # fresh loss (load_state_dict copies into the existing buffer) loses nothing.
    embeddings, labels, _ = problem(torch.float32)
    trained = CurricularFaceLoss(NUM_CLASSES, DIM)
    trained(embeddings, labels)
    resumed = CurricularFaceLoss(NUM_CLASSES, DIM)
    assert resumed.running_hardness.dtype == torch.float64
    resumed.load_state_dict(trained.state_dict())
    assert float(resumed.running_hardness) == float(trained.running_hardness) != 0.0


def test_dynamic_margin_records_its_settings():
    loss_fn = head(DynamicMarginLoss, problem()[2], class_counts=COUNTS)
    assert {"a", "power", "b"} <= set(loss_fn._record_these)
    assert (loss_fn.a, loss_fn.power, loss_fn.b) == (0.5, 0.25, 0.05)
