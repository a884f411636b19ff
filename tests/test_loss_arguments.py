"""Constructor arguments and call inputs, checked the same way by every loss and regularizer."""

import math

import numpy as np
import pytest
import torch

from pml_largest_margin.losses import (
    AdaFaceLoss,
    CurricularFaceLoss,
    DynamicMarginLoss,
    ElasticFaceLoss,
    GeneralizedMarginSoftmaxLoss,
    LargestMarginSoftmaxLoss,
    MagFaceLoss,
)
from pml_largest_margin.losses.margin_functions import combined_margin_function
from pml_largest_margin.regularizers import SampleMarginRegularizer, ZeroCentroidRegularizer
from pml_largest_margin.validation import check_integer, check_real

LOSSES = {
    "lm-softmax": LargestMarginSoftmaxLoss,
    "gm-softmax": GeneralizedMarginSoftmaxLoss,
    **{
        f"preset-{name}": (
            lambda *args, _name=name, **kwargs: GeneralizedMarginSoftmaxLoss.preset(
                _name, *args, **kwargs
            )
        )
        for name in GeneralizedMarginSoftmaxLoss.preset_names()
    },
    # The margin heads share the same constructor checks (AdaCos sets its own scale).
    "adaface": AdaFaceLoss,
    "magface": MagFaceLoss,
    "curricularface": CurricularFaceLoss,
    "elasticface": ElasticFaceLoss,
    "dynamic-margin": lambda *args, **kwargs: DynamicMarginLoss(
        *args, class_counts=[5, 4, 3, 2, 1], **kwargs
    ),
}
SCALARS_OF_16 = [16, 16.0, np.float32(16), np.float64(16), np.int64(16), torch.tensor(16.0)]


@pytest.mark.parametrize("make", sorted(LOSSES))
@pytest.mark.parametrize("scale", SCALARS_OF_16, ids=repr)
def test_numpy_and_torch_scalars_are_accepted_for_scale(make, scale):
    loss_fn = LOSSES[make](5, 4, scale=scale)
    assert type(loss_fn.scale) is float and loss_fn.scale == 16.0


@pytest.mark.parametrize("make", sorted(LOSSES))
@pytest.mark.parametrize(
    ("scale", "error"),
    [
        (True, TypeError),
        (np.bool_(True), TypeError),
        (torch.tensor(True), TypeError),
        (torch.tensor([16.0]), TypeError),
        ("16", TypeError),
        (None, TypeError),
        (0.0, ValueError),
        (-1.0, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        (np.float32("nan"), ValueError),
    ],
    ids=repr,
)
def test_bad_scales_are_refused(make, scale, error):
    with pytest.raises(error, match="scale"):
        LOSSES[make](5, 4, scale=scale)


@pytest.mark.parametrize("make", sorted(LOSSES))
def test_sizes_must_be_integers_in_range(make):
    loss_fn = LOSSES[make](np.int64(5), torch.tensor(4))
    assert (type(loss_fn.num_classes), type(loss_fn.embedding_size)) == (int, int)
    assert loss_fn.W.shape == (4, 5)
    for bad, error in [(True, TypeError), (5.0, TypeError), (1, ValueError), (-3, ValueError)]:
        with pytest.raises(error, match="num_classes"):
            LOSSES[make](bad, 4)
    for bad, error in [(True, TypeError), (4.5, TypeError), (0, ValueError)]:
        with pytest.raises(error, match="embedding_size"):
            LOSSES[make](5, bad)


@pytest.mark.parametrize("make", sorted(LOSSES))
def test_flags_must_be_booleans(make):
    for name in ("validate_inputs", "record_class_margin"):
        with pytest.raises(TypeError, match=name):
            LOSSES[make](5, 4, **{name: "yes"})
        assert getattr(LOSSES[make](5, 4, **{name: np.bool_(False)}), name) is False


@pytest.mark.parametrize(
    ("preset", "margin"),
    [
        ("sphereface", math.inf),
        ("sphereface", math.nan),
        ("sphereface", 0.0),
        ("cosface", math.inf),
        ("cosface", -math.inf),
        ("arcface", math.pi),
        ("arcface", -0.1),
        ("arcface", math.inf),
    ],
)
def test_preset_margins_are_checked_per_head(preset, margin):
    with pytest.raises(ValueError, match="margin"):
        GeneralizedMarginSoftmaxLoss.preset(preset, 5, 4, margin=margin)


def test_margins_take_numpy_and_torch_scalars_but_not_bools():
    loss_fn = GeneralizedMarginSoftmaxLoss(5, 4, m1=np.float32(2), m2=torch.tensor(0.25))
    assert (loss_fn.m1, loss_fn.m2, loss_fn.m3) == (2.0, 0.25, 0.0)
    assert all(type(m) is float for m in (loss_fn.m1, loss_fn.m2, loss_fn.m3))
    with pytest.raises(TypeError, match="m1"):
        GeneralizedMarginSoftmaxLoss(5, 4, m1=True)
    with pytest.raises(TypeError, match="m3"):
        GeneralizedMarginSoftmaxLoss(5, 4, m3=np.bool_(False))


@pytest.mark.parametrize(
    ("margins", "name"),
    [
        ((0.0, 0.0, 0.0), "m1"),
        ((math.inf, 0.0, 0.0), "m1"),
        ((1.0, math.pi, 0.0), "m2"),
        ((1.0, -1e-9, 0.0), "m2"),
        ((1.0, 0.0, math.inf), "m3"),
        ((1.0, 0.0, math.nan), "m3"),
    ],
)
def test_combined_margin_ranges(margins, name):
    with pytest.raises(ValueError, match=name):
        combined_margin_function(*margins)
    with pytest.raises(ValueError, match=name):
        GeneralizedMarginSoftmaxLoss(5, 4, **dict(zip(("m1", "m2", "m3"), margins, strict=True)))


def test_combined_margin_just_inside_the_ranges():
    # An integer m1 with m2 > 0 is not SphereFace's Chebyshev polynomial: cos(2θ + 0.3), piecewise.
    psi = combined_margin_function(2, 0.3, 0)
    expected = []
    for cosine in (0.5, -0.2):
        shifted = 2 * math.acos(cosine) + 0.3
        k = math.floor(shifted / math.pi)
        expected.append((-1) ** k * math.cos(shifted) - 2 * k)
    cosines = torch.tensor([0.5, -0.2], dtype=torch.float64)
    assert psi(cosines).tolist() == pytest.approx(expected, abs=1e-12)
    assert torch.isfinite(combined_margin_function(1, math.nextafter(math.pi, 0), 0)(cosines)).all()


def test_regularizer_arguments():
    for weight in (0.0, np.float32(0.5), torch.tensor(2.0)):
        loss_fn = LargestMarginSoftmaxLoss(
            5,
            4,
            sample_margin_regularizer=SampleMarginRegularizer(),
            sample_margin_reg_weight=weight,
        )
        assert type(loss_fn.sample_margin_reg_weight) is float
    for weight, error in [
        (-0.1, ValueError),
        (math.inf, ValueError),
        (math.nan, ValueError),
        (True, TypeError),
    ]:
        with pytest.raises(error, match="sample_margin_reg_weight"):
            GeneralizedMarginSoftmaxLoss(
                5,
                4,
                sample_margin_regularizer=SampleMarginRegularizer(),
                sample_margin_reg_weight=weight,
            )
    with pytest.raises(ValueError, match="form"):
        ZeroCentroidRegularizer(form="median")
    with pytest.raises(ValueError, match="form"):
        ZeroCentroidRegularizer(form=None)
    with pytest.raises(TypeError, match="record_class_margin"):
        ZeroCentroidRegularizer(record_class_margin=1)


@pytest.mark.parametrize("make", sorted(LOSSES))
def test_inputs_of_the_wrong_type_give_a_clear_error(make):
    loss_fn = LOSSES[make](5, 4)
    embeddings = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="labels must be a torch.Tensor, got list"):
        loss_fn(embeddings, [0, 1])
    with pytest.raises(TypeError, match="labels must be a torch.Tensor, got ndarray"):
        loss_fn(embeddings, np.array([0, 1]))
    with pytest.raises(TypeError, match="embeddings must be a torch.Tensor"):
        loss_fn(embeddings.tolist(), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        loss_fn(embeddings)
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        SampleMarginRegularizer()(embeddings, [0, 1], margins=torch.zeros(2))
    with pytest.raises(TypeError, match="margins"):
        SampleMarginRegularizer()(embeddings, torch.tensor([0, 1]), margins=[0.0, 0.0])


def test_check_helpers_directly():
    assert check_real(np.float16(0.5), "x", greater_than=0, at_most=1) == 0.5
    assert check_real(1.0, "x", greater_than=0, at_most=1) == 1.0
    with pytest.raises(ValueError, match=r"x must be a finite number > 0 and <= 1, got 0.0"):
        check_real(0.0, "x", greater_than=0, at_most=1)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        check_real(1.5, "x", greater_than=0, at_most=1, bounds_text="in (0, 1]")
    with pytest.raises(ValueError, match="finite"):
        check_real(-math.inf, "x")
    assert check_integer(torch.tensor(3, dtype=torch.int32), "n", at_least=3) == 3
    with pytest.raises(TypeError, match="integer"):
        check_integer(torch.tensor(3.0), "n")
    with pytest.raises(ValueError, match=">= 4"):
        check_integer(3, "n", at_least=4)
