import math

import pytest
import torch
from loss_utils import seeded_randn
from pytorch_metric_learning import losses, miners, reducers, trainers
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.losses.mixins import WeightRegularizerMixin
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_largest_margin.margins import class_margin, cosine_logits, sample_margins
from pml_largest_margin.prototypes import simplex_prototypes
from pml_largest_margin.regularizers import (
    SampleMarginRegularizer,
    SampleMarginRegularizerMixin,
    ZeroCentroidRegularizer,
    with_sample_margin_regularizer,
)

PML_LOSSES = [
    losses.ArcFaceLoss,
    losses.CosFaceLoss,
    losses.NormalizedSoftmaxLoss,
    losses.SphereFaceLoss,
    losses.SubCenterArcFaceLoss,
]


def batch(num_classes=5, dim=8, size=12, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(size, dim, generator=generator, dtype=dtype)
    labels = torch.randint(0, num_classes, (size,), generator=generator)
    return embeddings, labels


# --- SampleMarginRegularizer ------------------------------------------------------------------


def test_sample_margin_regularizer_hand_made():
    W = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]])  # prototypes at 0°, 90°, 180°
    embeddings = torch.tensor([[3.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    # γ = (1, 0, -1): R_sm = -mean γ = 0; with the third sample weighted 0 and the first 1 ...
    assert float(SampleMarginRegularizer()(embeddings, labels, W)) == pytest.approx(0.0, abs=1e-7)
    weights = torch.tensor([1.0, 1.0, 0.0])
    value = SampleMarginRegularizer()(embeddings, labels, W, miner_weights=weights)
    assert float(value) == pytest.approx(-1.0 / 3.0)
    summed = SampleMarginRegularizer(reducer=reducers.SumReducer())(embeddings, labels, W)
    assert float(summed) == pytest.approx(0.0, abs=1e-7)
    only_positive = SampleMarginRegularizer(reducer=reducers.AvgNonZeroReducer())
    assert float(only_positive(embeddings, labels, W)) == pytest.approx(1.0)  # the -γ_3 = 1 term
    # A reducer that reads the labels gets them: class 1 weighs 3, class 0 weighs 1 (PML's
    # ClassWeightedReducer multiplies each term by its class's weight, then averages).
    by_class = SampleMarginRegularizer(
        reducer=reducers.ClassWeightedReducer(torch.tensor([1.0, 3.0]))
    )
    assert float(by_class(embeddings, labels, W)) == pytest.approx((-1.0 - 3 * 0.0 + 3 * 1.0) / 3)


def test_sample_margin_regularizer_cosine_path_and_stats():
    embeddings, labels = batch(dtype=torch.float64)
    W = torch.randn(8, 5, dtype=torch.float64)
    regularizer = SampleMarginRegularizer(collect_stats=True)
    from_w = regularizer(embeddings, labels, W)
    margins = sample_margins(embeddings, labels, W)
    assert float(from_w) == pytest.approx(-float(margins.mean()))
    assert regularizer.mean_sample_margin == pytest.approx(float(margins.mean()))
    assert regularizer.min_sample_margin == pytest.approx(float(margins.min().detach()))
    from_cosines = regularizer(embeddings, labels, cosines=cosine_logits(embeddings, W))
    assert float(from_cosines) == pytest.approx(float(from_w))
    assert "mean_sample_margin" not in getattr(SampleMarginRegularizer(), "_record_these_stats", [])


def test_sample_margin_regularizer_from_margins_matches_w_path():
    embeddings, labels = batch(dtype=torch.float64)
    W = torch.randn(8, 5, dtype=torch.float64)
    weights = torch.linspace(0.2, 1.0, 12, dtype=torch.float64)
    margins = sample_margins(embeddings, labels, W).requires_grad_(True)
    regularizer = SampleMarginRegularizer(collect_stats=True, reducer=reducers.SumReducer())
    value = regularizer(embeddings, labels, margins=margins, miner_weights=weights)
    expected = SampleMarginRegularizer(reducer=reducers.SumReducer())(
        embeddings, labels, W, miner_weights=weights
    )
    assert float(value) == pytest.approx(float(expected), rel=1e-12)
    assert regularizer.min_sample_margin == pytest.approx(float(margins.min()))
    value.backward()
    torch.testing.assert_close(margins.grad, -weights)


def test_sample_margin_regularizer_gradcheck():
    embeddings, labels = batch(num_classes=4, dim=3, size=6, seed=1, dtype=torch.float64)
    embeddings.requires_grad_(True)
    W = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    regularizer = SampleMarginRegularizer()
    assert torch.autograd.gradcheck(lambda e, w: regularizer(e, labels, w), (embeddings, W))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({}, ValueError, "exactly one"),
        ({"W": seeded_randn(8, 5), "cosines": seeded_randn(12, 5)}, ValueError, "exactly one"),
        ({"cosines": seeded_randn(11, 5)}, ValueError, "rows"),
        ({"cosines": torch.full((12, 5), math.nan)}, ValueError, "NaN"),
        ({"W": seeded_randn(7, 5)}, ValueError, "rows"),
        ({"W": seeded_randn(8, 3)}, ValueError, "labels"),
        ({"W": seeded_randn(8, 5), "miner_weights": torch.ones(3)}, ValueError, "miner_weights"),
        ({"W": seeded_randn(8, 5), "margins": torch.zeros(12)}, ValueError, "exactly one"),
        ({"margins": torch.zeros(11)}, ValueError, r"shape \(12,\)"),
        ({"margins": torch.zeros(12, 1)}, ValueError, r"shape \(12,\)"),
    ],
)
def test_sample_margin_regularizer_bad_input(kwargs, error, match):
    embeddings, labels = batch()
    labels[0] = 4
    with pytest.raises(error, match=match):
        SampleMarginRegularizer()(embeddings, labels, **kwargs)


# --- Mixin and subclass factory on PML's losses -------------------------------------------------


def make_pair(loss_class, num_classes=5, dim=8, **kwargs):
    """A PML loss and its sample-margin version sharing the same W."""
    if loss_class is losses.SubCenterArcFaceLoss:
        kwargs["sub_centers"] = 3
    base = loss_class(num_classes=num_classes, embedding_size=dim, **kwargs)
    regularized = with_sample_margin_regularizer(loss_class)(
        num_classes=num_classes, embedding_size=dim, sample_margin_reg_weight=0.3, **kwargs
    )
    with torch.no_grad():
        regularized.W.copy_(base.W)
    return base, regularized


@pytest.mark.parametrize("loss_class", PML_LOSSES)
def test_factory_adds_lambda_times_r_sm_to_pml_losses(loss_class):
    base, regularized = make_pair(loss_class)
    assert regularized.sub_loss_names() == ["loss", "sample_margin_loss"]
    assert isinstance(regularized.reducer, reducers.MultipleReducers)
    assert set(regularized.reducer.reducers) == {"loss", "sample_margin_loss"}
    assert isinstance(regularized, loss_class)
    assert type(regularized).__name__ == f"SampleMargin{loss_class.__name__}"
    embeddings, labels = batch()
    sub_centers = getattr(regularized, "sub_centers", 1)
    r_sm = -sample_margins(embeddings, labels, base.W, sub_centers=sub_centers).mean()
    expected = base(embeddings, labels) + 0.3 * r_sm
    torch.testing.assert_close(regularized(embeddings, labels), expected)


def test_factory_respects_miner_weights():
    base, regularized = make_pair(losses.CosFaceLoss)
    embeddings, labels = batch(size=16)
    labels = torch.arange(16) % 4
    indices_tuple = (
        torch.tensor([0, 1, 1, 2]),
        torch.tensor([4, 5, 5, 6]),
        torch.tensor([3, 3, 7, 7]),
    )
    weights = lmu.convert_to_weights(indices_tuple, labels, dtype=embeddings.dtype)
    assert float(weights.min()) == 0.0  # some samples are left out by this "miner"
    r_sm = -(sample_margins(embeddings, labels, base.W) * weights).mean()
    expected = base(embeddings, labels, indices_tuple) + 0.3 * r_sm
    torch.testing.assert_close(regularized(embeddings, labels, indices_tuple), expected)
    miner = miners.MultiSimilarityMiner()
    mined = miner(embeddings, labels)
    regularized(embeddings, labels, mined).backward()


def test_factory_with_weight_regularizer_and_do_nothing_reducer():
    loss = with_sample_margin_regularizer(losses.ArcFaceLoss)(
        num_classes=5,
        embedding_size=8,
        weight_regularizer=ZeroCentroidRegularizer(),
        weight_reg_weight=2.0,
        reducer=reducers.DoNothingReducer(),
    )
    assert loss.sub_loss_names() == ["loss", "sample_margin_loss", "weight_reg_loss"]
    embeddings, labels = batch()
    loss_dict = loss(embeddings, labels)
    assert set(loss_dict) == {"loss", "sample_margin_loss", "weight_reg_loss"}
    r_sm = -sample_margins(embeddings, labels, loss.W).mean()
    torch.testing.assert_close(loss_dict["sample_margin_loss"]["losses"], r_sm)
    r_w = torch.nn.functional.normalize(loss.W, dim=0).mean(dim=1).square().sum()
    torch.testing.assert_close(loss_dict["weight_reg_loss"]["losses"], 2.0 * r_w)


def test_factory_custom_regularizer_reducer_and_stats():
    regularizer = SampleMarginRegularizer(reducer=reducers.SumReducer(), collect_stats=True)
    loss = with_sample_margin_regularizer(losses.NormalizedSoftmaxLoss)(
        num_classes=5, embedding_size=8, sample_margin_regularizer=regularizer
    )
    assert loss.sample_margin_regularizer is regularizer
    assert "sample_margin_reg_weight" in loss._record_these
    embeddings, labels = batch()
    margins = sample_margins(embeddings, labels, loss.W)
    loss_dict = loss.compute_loss(embeddings, labels, None, embeddings, labels)
    torch.testing.assert_close(loss_dict["sample_margin_loss"]["losses"], -margins.sum())
    assert regularizer.min_sample_margin == pytest.approx(float(margins.min().detach()))


def test_factory_is_cached_and_rejects_bad_classes():
    assert with_sample_margin_regularizer(losses.ArcFaceLoss) is with_sample_margin_regularizer(
        losses.ArcFaceLoss
    )
    with pytest.raises(TypeError, match="PML loss class"):
        with_sample_margin_regularizer(torch.nn.Linear)
    with pytest.raises(TypeError, match="no prototypes"):
        with_sample_margin_regularizer(losses.ContrastiveLoss)()
    with pytest.raises(TypeError, match="already supports"):
        with_sample_margin_regularizer(ToyLoss)
    with pytest.raises(TypeError, match="SampleMarginRegularizer"):
        ToyLoss(num_classes=3, embedding_size=2, sample_margin_regularizer="yes")


class ToyLoss(SampleMarginRegularizerMixin, WeightRegularizerMixin, BaseMetricLossFunction):
    """The shape our own losses take: they pass the cosines they already computed."""

    def __init__(self, num_classes, embedding_size, **kwargs):
        super().__init__(**kwargs)
        self.W = torch.nn.Parameter(torch.randn(embedding_size, num_classes))

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        cosines = cosine_logits(embeddings, self.W)
        loss_dict = {
            "loss": {
                "losses": torch.nn.functional.cross_entropy(10 * cosines, labels, reduction="none"),
                "indices": torch.arange(len(labels)),
                "reduction_type": "element",
            }
        }
        self.add_sample_margin_regularization_to_loss_dict(
            loss_dict, embeddings, labels, indices_tuple, cosines=cosines
        )
        self.add_weight_regularization_to_loss_dict(loss_dict, self.W.t())
        return loss_dict


def test_mixin_on_a_loss_of_our_shape():
    plain = ToyLoss(num_classes=5, embedding_size=8)
    assert plain.sub_loss_names() == ["loss"]
    loss = ToyLoss(
        num_classes=5,
        embedding_size=8,
        sample_margin_regularizer=SampleMarginRegularizer(),
        sample_margin_reg_weight=0.5,
        weight_regularizer=ZeroCentroidRegularizer(),
    )
    assert loss.sub_loss_names() == ["loss", "sample_margin_loss", "weight_reg_loss"]
    embeddings, labels = batch()
    with torch.no_grad():
        plain.W.copy_(loss.W)
    r_sm = -sample_margins(embeddings, labels, loss.W).mean()
    r_w = ZeroCentroidRegularizer()(loss.W.t())
    torch.testing.assert_close(
        loss(embeddings, labels), plain(embeddings, labels) + 0.5 * r_sm + r_w
    )


def test_trainer_step_with_regularized_pml_loss():
    torch.manual_seed(0)
    num_classes, dim = 4, 6
    data = torch.randn(32, 10)
    labels = torch.arange(32) % num_classes
    dataset = torch.utils.data.TensorDataset(data, labels)
    trunk = torch.nn.Linear(10, dim)
    loss = with_sample_margin_regularizer(losses.ArcFaceLoss)(
        num_classes=num_classes,
        embedding_size=dim,
        weight_regularizer=ZeroCentroidRegularizer(collect_stats=True),
        sample_margin_regularizer=SampleMarginRegularizer(collect_stats=True),
    )
    before = (trunk.weight.clone(), loss.W.detach().clone())
    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": torch.nn.Identity()},
        optimizers={
            "trunk_optimizer": torch.optim.SGD(trunk.parameters(), lr=0.1),
            "metric_loss_optimizer": torch.optim.SGD(loss.parameters(), lr=0.1),
        },
        batch_size=8,
        loss_funcs={"metric_loss": loss},
        dataset=dataset,
        dataloader_num_workers=0,
        iterations_per_epoch=2,
    )
    trainer.train(num_epochs=1)
    assert not torch.equal(trunk.weight, before[0])
    assert not torch.equal(loss.W, before[1])
    assert -2.0 <= loss.sample_margin_regularizer.min_sample_margin <= 2.0
    assert 0.0 < loss.weight_regularizer.class_margin_degrees <= 180.0


# --- ZeroCentroidRegularizer ------------------------------------------------------------------


def test_zero_centroid_closed_forms():
    simplex = simplex_prototypes(6, 8, dtype=torch.float64)
    assert float(ZeroCentroidRegularizer()(simplex.t())) == pytest.approx(0.0, abs=1e-15)
    collapsed = torch.tensor([[2.0, 0.0], [0.5, 0.0], [0.0, 3.0]])  # unit rows e1, e1, e2
    assert float(ZeroCentroidRegularizer()(collapsed)) == pytest.approx(5.0 / 9.0)
    assert float(ZeroCentroidRegularizer(form="sum")(collapsed)) == pytest.approx(5.0)


def test_zero_centroid_stats():
    weights = torch.tensor([[2.0, 0.0], [0.5, 0.0], [0.0, 3.0]])
    regularizer = ZeroCentroidRegularizer(collect_stats=True)
    regularizer(weights)
    assert regularizer.centroid_norm == pytest.approx(math.sqrt(5.0) / 3.0)
    assert regularizer.class_margin_degrees == pytest.approx(0.0, abs=1e-6)
    quiet = ZeroCentroidRegularizer(collect_stats=True, record_class_margin=False)
    quiet(weights)
    assert "class_margin_degrees" not in quiet._record_these_stats
    W = torch.randn(5, 30)
    regularizer(W.t())
    assert regularizer.class_margin_degrees == pytest.approx(class_margin(W).degrees)


def test_zero_centroid_gradcheck():
    weights = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    for form in ("mean", "sum"):
        regularizer = ZeroCentroidRegularizer(form=form)
        assert torch.autograd.gradcheck(regularizer, (weights,))


@pytest.mark.parametrize("loss_class", [*PML_LOSSES, losses.LargeMarginSoftmaxLoss])
def test_zero_centroid_in_pml_weight_regularizer_slot(loss_class):
    # SubCenterArcFaceLoss hands over all C·k sub-centres; R_w is then their centroid.
    loss = loss_class(
        num_classes=6,
        embedding_size=4,
        weight_regularizer=ZeroCentroidRegularizer(),
        weight_reg_weight=3.0,
        reducer=reducers.DoNothingReducer(),
    )
    embeddings, labels = batch(num_classes=6, dim=4)
    loss_dict = loss(embeddings, labels)
    expected = 3.0 * torch.nn.functional.normalize(loss.W, dim=0).mean(dim=1).square().sum()
    torch.testing.assert_close(loss_dict["weight_reg_loss"]["losses"], expected)


def test_zero_centroid_bad_input():
    with pytest.raises(ValueError, match="form"):
        ZeroCentroidRegularizer(form="median")
    with pytest.raises(ValueError, match="at least 2"):
        ZeroCentroidRegularizer()(torch.randn(1, 4))
    with pytest.raises(ValueError, match="NaN"):
        ZeroCentroidRegularizer()(torch.tensor([[math.nan, 1.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="zero prototype"):
        ZeroCentroidRegularizer()(torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="2-D"):
        ZeroCentroidRegularizer()(torch.randn(4))


def test_generated_loss_pickles_and_copies():
    import copy
    import pickle

    loss = with_sample_margin_regularizer(losses.SubCenterArcFaceLoss)(
        num_classes=4, embedding_size=6, sample_margin_reg_weight=0.2
    )
    embeddings, labels = batch(num_classes=4, dim=6)
    for clone in (pickle.loads(pickle.dumps(loss)), copy.deepcopy(loss)):
        assert type(clone) is type(loss)
        torch.testing.assert_close(clone(embeddings, labels), loss(embeddings, labels))


def test_regularizers_under_bfloat16_autocast():
    loss = with_sample_margin_regularizer(losses.CosFaceLoss)(
        num_classes=5, embedding_size=8, weight_regularizer=ZeroCentroidRegularizer()
    )
    embeddings, labels = batch()
    embeddings.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(embeddings, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(embeddings.grad).all()
    half = ZeroCentroidRegularizer()(loss.W.detach().t().to(torch.bfloat16))
    reference = ZeroCentroidRegularizer()(loss.W.detach().t())
    assert float(half) == pytest.approx(float(reference), abs=2e-2)


# --- edges of SampleMarginRegularizer --------------------------------------------------------


def test_sample_margin_regularizer_records_no_stats_without_collect_stats():
    embeddings, labels = batch(dtype=torch.float64)
    W = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    quiet = SampleMarginRegularizer(collect_stats=False)
    quiet(embeddings, labels, W)
    quiet(embeddings, labels, margins=sample_margins(embeddings, labels, W))
    assert not hasattr(quiet, "mean_sample_margin") and not hasattr(quiet, "min_sample_margin")


def test_sample_margin_regularizer_stats_reset_on_an_empty_batch():
    embeddings, labels = batch(dtype=torch.float64)
    W = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    regularizer = SampleMarginRegularizer(collect_stats=True)
    regularizer(embeddings, labels, W)
    assert regularizer.min_sample_margin != 0.0
    empty = torch.zeros(0, 8, dtype=torch.float64, requires_grad=True)
    value = regularizer(empty, torch.zeros(0, dtype=torch.long), W)
    assert (regularizer.mean_sample_margin, regularizer.min_sample_margin) == (0, 0)
    assert float(value) == 0.0  # not the NaN of a mean over nothing
    value.backward()
    assert empty.grad is not None and empty.grad.shape == (0, 8)


def test_sample_margin_regularizer_refuses_one_column_of_cosines():
    embeddings, _ = batch()
    with pytest.raises(ValueError, match="at least 2 classes"):
        SampleMarginRegularizer()(
            embeddings, torch.zeros(12, dtype=torch.long), cosines=torch.rand(12, 1)
        )


def test_zero_centroid_regularizer_records_its_settings_and_stats_as_pml_does():
    quiet = ZeroCentroidRegularizer()
    assert "form" in quiet._record_these and not getattr(quiet, "_record_these_stats", [])
    regularizer = ZeroCentroidRegularizer(collect_stats=True)
    assert regularizer._record_these == ["form"]
    assert sorted(regularizer._record_these_stats) == ["centroid_norm", "class_margin_degrees"]
    regularizer(seeded_randn(5, 8))
    assert regularizer.centroid_norm > 0 and regularizer.class_margin_degrees > 0
    regularizer.reset_stats()
    assert regularizer.centroid_norm == 0 and regularizer.class_margin_degrees == 0
    assert regularizer.form == "mean"
    assert ZeroCentroidRegularizer(
        collect_stats=True, record_class_margin=False
    )._record_these_stats == ["centroid_norm"]


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: ZeroCentroidRegularizer(record_class_margin="yes"),
            "^record_class_margin must be True or False",
        ),
        (
            lambda: ZeroCentroidRegularizer()(torch.full((5, 8), math.nan)),
            r"weights \(W\.t\(\), one row per class\) contains NaN",
        ),
        (
            lambda: ZeroCentroidRegularizer()(torch.eye(5, 8) * torch.arange(5.0)[:, None]),
            "^weights has a zero prototype row; its direction is undefined$",
        ),
    ],
)
def test_zero_centroid_regularizer_errors_name_what_is_wrong(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make()
