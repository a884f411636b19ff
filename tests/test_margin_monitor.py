"""MarginMonitor: its per-epoch values against formulas written out here, the PML hooks, the files."""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from pml_largest_margin import margin_monitor
from pml_largest_margin.losses import GeneralizedMarginSoftmaxLoss, LargestMarginSoftmaxLoss
from pml_largest_margin.losses.base_margin_softmax_loss import BaseMarginSoftmaxLoss
from pml_largest_margin.margin_monitor import (
    MarginMonitor,
    format_epoch_line,
    prototype_cosine_histogram,
)
from pml_largest_margin.margins import class_margin
from pml_largest_margin.regularizers import SampleMarginRegularizer
from pml_largest_margin.training.loss_factory import LOSS_NAMES, build_loss
from pml_largest_margin.training.trainer import Schedule, build_trainer, run_epochs

NUM_CLASSES, EMBEDDING_SIZE = 6, 5


def _loss(**kwargs) -> LargestMarginSoftmaxLoss:
    options = dict(collect_stats=True, record_target_cosines=True, record_class_margin=False)
    return LargestMarginSoftmaxLoss(NUM_CLASSES, EMBEDDING_SIZE, **{**options, **kwargs}).double()


def _batches(seed: int, sizes=(7, 9, 5)):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, EMBEDDING_SIZE, generator=generator, dtype=torch.float64),
            torch.randint(0, NUM_CLASSES - 1, (size,), generator=generator),  # class 5 unseen
        )
        for size in sizes
    ]


def _direct(embeddings: torch.Tensor, labels: torch.Tensor, W: torch.Tensor):
    """Margins and target angles by the textbook formulas, float64."""
    z = embeddings / embeddings.norm(dim=1, keepdim=True)
    w = W / W.norm(dim=0, keepdim=True)
    cosines = z @ w
    target = cosines[torch.arange(len(labels)), labels]
    others = cosines.clone()
    others[torch.arange(len(labels)), labels] = -math.inf
    return target - others.max(dim=1).values, torch.rad2deg(torch.acos(target.clamp(-1, 1)))


@pytest.mark.parametrize("pending_batches", [64, 2])  # 2: folded once mid-epoch, once at its end
@pytest.mark.parametrize("recorded", [True, False])
def test_epoch_values_equal_the_formulas(recorded, pending_batches, monkeypatch):
    monkeypatch.setattr(margin_monitor, "_PENDING_BATCHES", pending_batches)
    loss = _loss() if recorded else pml_losses.CosFaceLoss(NUM_CLASSES, EMBEDDING_SIZE).double()
    monitor = MarginMonitor(NUM_CLASSES, EMBEDDING_SIZE, histogram_bins=8)
    batches = _batches(0)
    for embeddings, labels in batches:
        loss(embeddings, labels)
        if recorded:
            monitor.update(loss)
        else:
            monitor.update(loss, embeddings, labels)
    record = monitor.end_epoch(loss.W)
    embeddings = torch.cat([e for e, _ in batches])
    labels = torch.cat([label for _, label in batches])
    margins, angles = _direct(embeddings, labels, loss.W.detach())

    assert record.epoch == 1 and record.num_samples == 21
    assert record.mean_sample_margin == pytest.approx(float(margins.mean()), abs=1e-12)
    assert record.min_sample_margin == pytest.approx(float(margins.min()), abs=1e-12)
    for c in range(NUM_CLASSES - 1):
        members = angles[labels == c]
        assert record.class_mean_angle_degrees[c] == pytest.approx(float(members.mean()), abs=1e-9)
        assert record.class_max_angle_degrees[c] == pytest.approx(float(members.max()), abs=1e-9)
    assert math.isnan(record.class_mean_angle_degrees[-1])
    assert math.isnan(record.class_max_angle_degrees[-1])
    assert record.max_angle_to_prototype_degrees == pytest.approx(float(angles.max()), abs=1e-9)
    expected = class_margin(loss.W)
    assert record.class_margin_degrees == expected.degrees
    assert record.closest_pair == expected.closest_pair
    assert record.class_margin_bound_degrees == pytest.approx(math.degrees(math.acos(-1 / 5)))
    assert record.sample_margin_bound == pytest.approx(6 / 5)
    assert sum(record.cosine_histogram) == NUM_CLASSES * (NUM_CLASSES - 1) // 2
    assert "epoch 1: class margin" in format_epoch_line(record)


def test_epochs_restart_their_accumulators():
    loss, monitor = _loss(), MarginMonitor(NUM_CLASSES, EMBEDDING_SIZE)
    first, second = _batches(1), _batches(2, sizes=(4,))
    for embeddings, labels in first:
        loss(embeddings, labels)
        monitor.update(loss)
    monitor.end_epoch(loss.W)
    loss(*second[0])
    monitor.update(loss)
    record = monitor.end_epoch(loss.W, epoch=7)
    margins, _ = _direct(*second[0], loss.W.detach())
    assert (record.epoch, record.num_samples) == (7, 4)
    assert record.min_sample_margin == pytest.approx(float(margins.min()), abs=1e-12)
    assert [r.epoch for r in monitor.history] == [1, 7]


def test_histogram_matches_numpy_across_tile_boundaries():
    generator = torch.Generator().manual_seed(3)
    W = torch.randn(4, 11, generator=generator, dtype=torch.float64)
    unit = (W / W.norm(dim=0)).numpy()
    rows, columns = np.triu_indices(11, k=1)
    cosines = np.einsum("dk,dk->k", unit[:, rows], unit[:, columns])
    expected, _ = np.histogram(cosines, bins=9, range=(-1, 1))
    for block_size in (1, 3, 4, 11, 1024):
        assert prototype_cosine_histogram(W, 9, block_size) == expected.tolist()


def test_histogram_edges_and_clipped_extremes():
    # cos = 0 lies on an edge (bin [0, 0.5)); cos = −1 falls in the first bin, +1 in the last.
    e1, e2 = torch.eye(3, dtype=torch.float64)[:2]
    W = torch.stack([e1, e2, -e1, 2 * e1], dim=1)
    assert prototype_cosine_histogram(W, 4) == [2, 0, 3, 1]
    with pytest.raises(ValueError, match="zero prototype column"):
        prototype_cosine_histogram(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="bins"):
        prototype_cosine_histogram(W, 0)


def test_histogram_is_skipped_above_the_class_limit():
    loss, monitor = _loss(), MarginMonitor(NUM_CLASSES, EMBEDDING_SIZE, histogram_max_classes=5)
    loss(*_batches(4)[0])
    monitor.update(loss)
    assert monitor.end_epoch(loss.W).cosine_histogram is None
    assert monitor.as_dict()["histogram"]["drawn"] is False


def test_bad_use_gives_clear_errors():
    loss, monitor = _loss(), MarginMonitor(NUM_CLASSES, EMBEDDING_SIZE)
    with pytest.raises(ValueError, match="no training batch"):
        monitor.end_epoch(loss.W)
    with pytest.raises(ValueError, match="record_target_cosines"):
        monitor.update(_loss(record_target_cosines=False))
    loss(*_batches(5)[0])
    monitor.update(loss)
    with pytest.raises(ValueError, match="no new target cosines"):
        monitor.update(loss)  # no forward since the last update
    with pytest.raises(ValueError, match="classes"):
        monitor.end_epoch(torch.randn(EMBEDDING_SIZE, 4))
    with pytest.raises(ValueError, match="num_classes"):
        MarginMonitor(1, 3)
    narrow = MarginMonitor(3, EMBEDDING_SIZE)  # the batch's labels reach 4
    loss(*_batches(5)[0])
    narrow.update(loss)
    with pytest.raises(ValueError, match="labels reach 4 but the monitor has 3 classes"):
        narrow.end_epoch(torch.randn(EMBEDDING_SIZE, 3))
    with pytest.raises(TypeError):
        MarginMonitor(3.0, 3)


def _trainer_run(loss, epochs=2, lr=1e-12):
    torch.manual_seed(0)
    dataset = torch.utils.data.TensorDataset(torch.randn(48, 8), torch.arange(48) % NUM_CLASSES)
    model = torch.nn.Linear(8, EMBEDDING_SIZE)
    monitor = MarginMonitor(NUM_CLASSES, EMBEDDING_SIZE)
    if not getattr(loss, "record_target_cosines", False):
        monitor.watch(loss)
    schedule = Schedule(epochs=epochs, batch_size=16, lr=lr)
    trainer = build_trainer(
        model,
        loss,
        dataset,
        schedule,
        device=torch.device("cpu"),
        end_of_iteration_hook=monitor.end_of_iteration_hook,
        end_of_epoch_hook=monitor.end_of_epoch_hook,
    )
    run_epochs(trainer, 1, epochs)
    return model, dataset, monitor


@pytest.mark.parametrize("recorded", [True, False])
def test_hooks_inside_a_pml_metric_loss_only_trainer(recorded):
    # With a learning rate of 1e-12 nothing moves, so every epoch sees each of the 48 samples
    # once against the same W: the epoch's margins are those of the whole training set.
    loss = (
        LargestMarginSoftmaxLoss(
            NUM_CLASSES, EMBEDDING_SIZE, collect_stats=True, record_target_cosines=True
        )
        if recorded
        else pml_losses.CosFaceLoss(NUM_CLASSES, EMBEDDING_SIZE)
    )
    model, dataset, monitor = _trainer_run(loss)
    with torch.no_grad():
        embeddings = model(dataset.tensors[0]).double()
    margins, angles = _direct(embeddings, dataset.tensors[1], loss.W.detach().double())
    assert [r.epoch for r in monitor.history] == [1, 2]
    for record in monitor.history:
        assert record.num_samples == 48
        assert record.mean_sample_margin == pytest.approx(float(margins.mean()), abs=1e-5)
        assert record.min_sample_margin == pytest.approx(float(margins.min()), abs=1e-5)
        assert record.max_angle_to_prototype_degrees == pytest.approx(float(angles.max()), abs=1e-3)
        assert record.class_margin_degrees == pytest.approx(class_margin(loss.W).degrees)


def test_iterations_per_epoch_splits_one_trainer_epoch():
    loss = LargestMarginSoftmaxLoss(
        NUM_CLASSES, EMBEDDING_SIZE, collect_stats=True, record_target_cosines=True
    )
    dataset = torch.utils.data.TensorDataset(torch.randn(32, 8), torch.arange(32) % NUM_CLASSES)
    monitor = MarginMonitor(NUM_CLASSES, EMBEDDING_SIZE, iterations_per_epoch=2)
    trainer = build_trainer(
        torch.nn.Linear(8, EMBEDDING_SIZE),
        loss,
        dataset,
        Schedule(epochs=3, batch_size=16),
        device=torch.device("cpu"),
        epochs_per_trainer_epoch=3,
        end_of_iteration_hook=monitor.end_of_iteration_hook,
        end_of_epoch_hook=monitor.end_of_epoch_hook,
    )
    run_epochs(trainer, 1, 1)
    assert [(r.epoch, r.num_samples) for r in monitor.history] == [(1, 32), (2, 32), (3, 32)]


def test_files_are_written_and_parse(tmp_path):
    pytest.importorskip("matplotlib")
    loss = _loss()
    monitor = MarginMonitor(NUM_CLASSES, EMBEDDING_SIZE)
    for seed in (6, 7):
        for embeddings, labels in _batches(seed):
            loss(embeddings, labels)
            monitor.update(loss)
        monitor.end_epoch(loss.W)
    csv_path, json_path, png_path = monitor.save(tmp_path / "out")
    rows = list(csv.DictReader(csv_path.open()))
    assert [int(row["epoch"]) for row in rows] == [1, 2]
    assert float(rows[1]["min_sample_margin"]) == monitor.history[1].min_sample_margin
    data = json.loads(json_path.read_text())
    assert len(data["epochs"]) == 2 and data["num_classes"] == NUM_CLASSES
    assert data["epochs"][0]["class_mean_angle_degrees"][-1] is None  # unseen class
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png_path.stat().st_size > 10_000  # four panels drawn, not an empty canvas
    assert len(data["histogram"]["edges"]) == len(data["epochs"][0]["cosine_histogram"]) + 1
    png = png_path.read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5_000


def test_stats_only_loss_and_regularized_loss_give_the_same_epoch():
    # With no sample-margin regularizer the loss takes its margins detached from the forward
    # pass; with one, the differentiable margins. The monitor must see the same numbers.
    stats_only = _loss()
    regularized = _loss(sample_margin_regularizer=SampleMarginRegularizer())
    with torch.no_grad():
        regularized.W.copy_(stats_only.W)
        stats_only.W[:, 3] = regularized.W[:, 3] = stats_only.W[:, 2]  # tied nearest classes
    monitors = [MarginMonitor(NUM_CLASSES, EMBEDDING_SIZE) for _ in range(2)]
    for embeddings, labels in _batches(8):
        for loss, monitor in zip((stats_only, regularized), monitors, strict=True):
            loss(embeddings, labels)
            monitor.update(loss)
    records = [
        monitor.end_epoch(loss.W)
        for loss, monitor in zip((stats_only, regularized), monitors, strict=True)
    ]
    assert records[0].as_dict() == records[1].as_dict()


@pytest.mark.parametrize("fused", [True, False])
def test_a_zero_prototype_column_has_target_cosine_zero(fused):
    # The fused kernel's t (recorded as it is) and the row-by-row gather of the losses that
    # do not run it (a custom phi) both clamp the norm, as the loss itself does.
    options = dict(collect_stats=True, record_target_cosines=True, record_class_margin=False)
    if fused:
        loss = _loss()
    else:
        loss = GeneralizedMarginSoftmaxLoss(
            NUM_CLASSES, EMBEDDING_SIZE, phi=lambda c: 0.5 * c, **options
        ).double()
    with torch.no_grad():
        loss.W[:, 1] = 0
    embeddings, labels = _batches(9)[0]
    labels[:2] = 1
    loss(embeddings, labels)
    assert (loss.target_cosines[labels == 1] == 0).all()
    _, angles = _direct(embeddings[labels != 1], labels[labels != 1], loss.W.detach())
    torch.testing.assert_close(
        torch.rad2deg(torch.acos(loss.target_cosines[labels != 1])), angles, rtol=0, atol=1e-9
    )


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_named_loss_is_monitored_with_the_formulas_values(name):
    # build_loss(record_margins=True): this package's losses record their stats (no extra
    # product); PML's and the plain softmax are measured from the watched inputs.
    torch.manual_seed(0)
    loss = build_loss(
        name, NUM_CLASSES, EMBEDDING_SIZE, record_margins=True, class_counts=[3] * NUM_CLASSES
    ).double()
    assert getattr(loss, "record_target_cosines", False) is isinstance(loss, BaseMarginSoftmaxLoss)
    monitor = MarginMonitor(NUM_CLASSES, EMBEDDING_SIZE)
    monitor.watch(loss)
    batches = _batches(10)
    for embeddings, labels in batches:
        loss(embeddings, labels)
        monitor.end_of_iteration_hook(SimpleNamespace(loss_funcs={"metric_loss": loss}))
    record = monitor.end_epoch(loss.W)
    # Every loss here leaves W as it was: the forward alone does not step.
    margins, angles = _direct(
        torch.cat([e for e, _ in batches]), torch.cat([y for _, y in batches]), loss.W.detach()
    )
    assert record.mean_sample_margin == pytest.approx(float(margins.mean()), abs=1e-12)
    assert record.min_sample_margin == pytest.approx(float(margins.min()), abs=1e-12)
    assert record.max_angle_to_prototype_degrees == pytest.approx(float(angles.max()), abs=1e-9)


@pytest.mark.parametrize("where", ["embeddings", "W"])
def test_nan_in_a_measured_batch_is_an_error_at_the_fold(where, monkeypatch):
    # The measured path checks shapes per batch and finiteness once per fold (no host copy per
    # batch): a NaN anywhere in a batch or in W still ends in a ValueError, not a NaN epoch.
    monkeypatch.setattr(margin_monitor, "_PENDING_BATCHES", 2)
    loss = pml_losses.CosFaceLoss(NUM_CLASSES, EMBEDDING_SIZE).double()
    monitor = MarginMonitor(NUM_CLASSES, EMBEDDING_SIZE)
    (embeddings, labels), (bad, bad_labels) = _batches(11, sizes=(4, 5))
    monitor.update(loss, embeddings, labels)
    if where == "embeddings":
        bad = bad.clone()
        bad[2, 1] = math.nan
    else:
        with torch.no_grad():
            loss.W[0, 3] = math.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        monitor.update(loss, bad, bad_labels)  # the second batch: the fold
    monitor = MarginMonitor(NUM_CLASSES, EMBEDDING_SIZE)
    monitor.update(loss, bad, bad_labels)
    with pytest.raises(ValueError, match="NaN or Inf"):
        monitor.end_epoch(loss.W)


def test_record_target_cosines_alone_feeds_the_monitor_without_pml_stats():
    # The monitor needs the loss's tensors only; PML's float stats (two host copies per batch)
    # stay off.
    recording, with_stats = _loss(collect_stats=False), _loss()
    with torch.no_grad():
        with_stats.W.copy_(recording.W)
    monitors = [MarginMonitor(NUM_CLASSES, EMBEDDING_SIZE) for _ in range(2)]
    for embeddings, labels in _batches(12):
        for loss, monitor in zip((recording, with_stats), monitors, strict=True):
            loss(embeddings, labels)
            monitor.update(loss)
    assert not hasattr(recording, "mean_sample_margin")
    assert isinstance(with_stats.mean_sample_margin, float)
    records = [m.end_epoch(recording.W) for m in monitors]
    assert records[0].as_dict() == records[1].as_dict()


def test_end_epoch_refuses_a_nan_w():
    loss, monitor = _loss(), MarginMonitor(NUM_CLASSES, EMBEDDING_SIZE)
    loss(*_batches(13)[0])
    monitor.update(loss)
    W = loss.W.detach().clone()
    W[1, 2] = math.nan
    with pytest.raises(ValueError, match="W contains NaN or Inf"):
        monitor.end_epoch(W)
