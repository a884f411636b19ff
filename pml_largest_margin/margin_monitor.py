"""Margins during training, epoch by epoch, against their bounds (docs/theory.md §2).

:class:`MarginMonitor` follows what the paper's argument is about while a network trains: the
class margin of the prototypes ``W`` rising towards ``arccos(−1/(C−1))``, the training sample
margins ``γ_i = cos θ_{i,y_i} − max_{j≠y_i} cos θ_ij`` growing towards ``C/(C−1)``, how far each
class's samples lie from their prototype, and how the prototype cosines are spread.

Per batch it reads what the loss recorded (``record_target_cosines=True``: the batch's target
cosines, labels and sample margins): no further matrix product. A loss that
records nothing (PML's ``ArcFaceLoss``, ``CosFaceLoss``...) can be monitored too, from the batch's
embeddings and labels; that costs one (N, C) cosine product per batch
(:func:`~pml_largest_margin.margins.sample_margins`).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .margins import (
    class_margin,
    class_margin_upper_bound,
    cosine_logits,
    max_over_sub_centers,
    sample_margin_upper_bound,
    sample_margins_from_cosines,
)
from .validation import check_embeddings, check_labels, check_prototypes

if TYPE_CHECKING:
    from ._pml import BaseTrainer

__all__ = ["EpochMargins", "MarginMonitor", "format_epoch_line", "prototype_cosine_histogram"]

# Above this many classes the C(C−1)/2 prototype cosines are not histogrammed (O(C²d) each epoch).
HISTOGRAM_MAX_CLASSES = 4096
HISTOGRAM_BINS = 40
# Side of the square tiles of the C × C cosine matrix visited by the histogram.
_TILE_SIZE = 1024
# Batches whose target cosines are kept before their angles are folded into the per-class
# statistics: a handful of tensor operations per fold instead of per batch (and, on a GPU, one
# copy to the host), while memory stays at this many batches' N values.
_PENDING_BATCHES = 64
CSV_COLUMNS = (
    "epoch",
    "num_samples",
    "class_margin_degrees",
    "class_margin_bound_degrees",
    "mean_sample_margin",
    "min_sample_margin",
    "sample_margin_bound",
    "mean_angle_to_prototype_degrees",
    "max_angle_to_prototype_degrees",
)


def prototype_cosine_histogram(
    W: torch.Tensor, bins: int = HISTOGRAM_BINS, block_size: int | None = None
) -> list[int]:
    """Counts of the cosines ``ŵ_j · ŵ_k`` of all pairs j < k of the prototypes ``W`` (d, C).

    ``bins`` equal bins over [−1, 1]: bin b holds ``[−1 + 2b/B, −1 + 2(b+1)/B)``, the last one
    closed (numpy.histogram's convention); cosines are clipped to [−1, 1] first. The cosine matrix
    is visited in ``block_size × block_size`` tiles (1024 by default), so memory stays at one tile
    whatever C is; time is O(C²d). The counts sum to C(C−1)/2.

    Raises:
        ValueError: fewer than 2 classes, a zero column, NaN/Inf, or ``bins``/``block_size`` < 1.
    """
    check_prototypes(W)
    num_classes = W.shape[1]
    if num_classes < 2:
        raise ValueError(f"the prototype cosines need at least 2 classes, got {num_classes}")
    if bins < 1:
        raise ValueError(f"bins must be positive, got {bins}")
    block_size = _TILE_SIZE if block_size is None else block_size
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    weights = W.detach()
    if weights.dtype in (torch.float16, torch.bfloat16):
        weights = weights.float()
    norms = torch.linalg.vector_norm(weights, dim=0)
    if bool((norms == 0).any()):
        raise ValueError("W has a zero prototype column; its direction is undefined")
    unit = weights / norms
    edges = torch.linspace(-1.0, 1.0, bins + 1, dtype=torch.float64, device=weights.device)
    counts = torch.zeros(bins, dtype=torch.int64, device=weights.device)
    for row_start in range(0, num_classes, block_size):
        rows = unit[:, row_start : row_start + block_size].t()
        for column_start in range(row_start, num_classes, block_size):
            cosines = (rows @ unit[:, column_start : column_start + block_size]).double()
            if column_start == row_start:  # diagonal tile: pairs j < k only
                upper = torch.triu_indices(*cosines.shape, offset=1, device=cosines.device)
                cosines = cosines[upper[0], upper[1]]
            cosines = cosines.flatten().clamp_(-1.0, 1.0)
            # bucketize(right=True) − 1 puts x in the bin whose left edge is the largest ≤ x.
            which = (torch.bucketize(cosines, edges, right=True) - 1).clamp_(0, bins - 1)
            counts += torch.bincount(which, minlength=bins)
    return counts.tolist()


@dataclass(frozen=True)
class EpochMargins:
    """The margins of one epoch: ``W``'s at its end, the training batches' over the epoch.

    Angles are in degrees, sample margins in cosine units. Per-class lists have one entry per
    class, ``nan`` for a class with no sample in the epoch. ``cosine_histogram`` is ``None``
    above the monitor's ``histogram_max_classes``.
    """

    epoch: int
    num_samples: int
    class_margin_degrees: float
    closest_pair: tuple[int, int]
    class_margin_bound_degrees: float
    mean_sample_margin: float
    min_sample_margin: float
    sample_margin_bound: float
    class_mean_angle_degrees: list[float]
    class_max_angle_degrees: list[float]
    cosine_histogram: list[int] | None

    @property
    def mean_angle_to_prototype_degrees(self) -> float:
        """Mean over the classes seen this epoch of their mean angle to their prototype."""
        seen = [a for a in self.class_mean_angle_degrees if not math.isnan(a)]
        return sum(seen) / len(seen) if seen else math.nan

    @property
    def max_angle_to_prototype_degrees(self) -> float:
        """The largest angle of any training sample to its class's prototype this epoch."""
        seen = [a for a in self.class_max_angle_degrees if not math.isnan(a)]
        return max(seen) if seen else math.nan

    def csv_row(self) -> dict:
        row = asdict(self)
        row["mean_angle_to_prototype_degrees"] = self.mean_angle_to_prototype_degrees
        row["max_angle_to_prototype_degrees"] = self.max_angle_to_prototype_degrees
        return {name: row[name] for name in CSV_COLUMNS}

    def as_dict(self) -> dict:
        """JSON-ready: tuples as lists, ``nan`` as ``None``."""
        record = asdict(self)
        record["closest_pair"] = list(self.closest_pair)
        for key in ("class_mean_angle_degrees", "class_max_angle_degrees"):
            record[key] = [None if math.isnan(a) else a for a in record[key]]
        record["mean_angle_to_prototype_degrees"] = _none_if_nan(
            self.mean_angle_to_prototype_degrees
        )
        record["max_angle_to_prototype_degrees"] = _none_if_nan(self.max_angle_to_prototype_degrees)
        return record


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else value


def format_epoch_line(record: EpochMargins) -> str:
    """One line for a terminal: the epoch's margins next to their bounds."""
    return (
        f"epoch {record.epoch}: class margin {record.class_margin_degrees:.2f}° "
        f"(bound {record.class_margin_bound_degrees:.2f}°), sample margin mean "
        f"{record.mean_sample_margin:.3f} min {record.min_sample_margin:.3f} "
        f"(bound {record.sample_margin_bound:.3f}), angle to prototype mean "
        f"{record.mean_angle_to_prototype_degrees:.1f}° max "
        f"{record.max_angle_to_prototype_degrees:.1f}°"
    )


class MarginMonitor:
    """Class and sample margins per epoch, from a plain training loop or a PML trainer.

    Plain loop: after each ``loss(embeddings, labels)`` call ``monitor.update(loss)`` (or
    ``monitor.update(loss, embeddings, labels)`` for a loss that records no stats), and at the
    end of each epoch ``monitor.end_epoch(loss.W)``. PML trainer: pass
    ``end_of_iteration_hook=monitor.end_of_iteration_hook`` and
    ``end_of_epoch_hook=monitor.end_of_epoch_hook`` (the loss is
    ``trainer.loss_funcs[loss_name]``); for a loss that records nothing, call
    ``monitor.watch(loss)`` first so the hook sees each batch's embeddings and labels.

    Per epoch (:class:`EpochMargins`): the class margin of ``W`` at the epoch's end and its bound;
    the mean (over samples) and minimum sample margin of the epoch's training batches, each batch
    measured with the prototypes it was trained against; per class, the mean and largest angle
    ``arccos(cos θ_{i,y_i})`` of its samples to its prototype; the histogram of the prototype
    cosines (:func:`prototype_cosine_histogram`, only up to ``histogram_max_classes`` classes:
    above, ``None``, since it costs O(C²d)). ``history`` keeps every epoch; :meth:`save` writes
    CSV, JSON and a PNG of the curves against their bounds.

    Our losses record what the monitor needs with ``record_target_cosines=True`` (PML's
    ``collect_stats`` is not needed; with it, ``record_class_margin=False`` avoids their own
    O(C²d) class margin at every batch: the monitor takes it once per epoch). ``on_epoch`` is
    called with each new :class:`EpochMargins` (e.g. ``lambda r: print(format_epoch_line(r))``).
    ``iterations_per_epoch`` makes the iteration hook close an epoch every that many batches,
    for trainers that fold several passes over the data into one trainer epoch.
    ``sub_centers=k``: the losses' ``W`` has k sub-centres per class (PML's layout, (d, C·k)); a
    class's cosine is its best sub-centre's, the class margin skips pairs of one class, and the
    prototype cosine histogram is not taken.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        histogram_bins: int = HISTOGRAM_BINS,
        histogram_max_classes: int = HISTOGRAM_MAX_CLASSES,
        iterations_per_epoch: int | None = None,
        loss_name: str = "metric_loss",
        on_epoch: Callable[[EpochMargins], object] | None = None,
        sub_centers: int = 1,
    ):
        for name, value, low in (
            ("num_classes", num_classes, 2),
            ("embedding_size", embedding_size, 1),
            ("histogram_bins", histogram_bins, 1),
            ("histogram_max_classes", histogram_max_classes, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"{name} must be at least {low}, got {value}")
        if not isinstance(sub_centers, int) or isinstance(sub_centers, bool) or sub_centers < 1:
            raise ValueError(f"sub_centers must be an integer >= 1, got {sub_centers!r}")
        if iterations_per_epoch is not None and iterations_per_epoch < 1:
            raise ValueError(f"iterations_per_epoch must be positive, got {iterations_per_epoch}")
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.sub_centers = sub_centers
        self.histogram_bins = histogram_bins
        self.histogram_max_classes = histogram_max_classes
        self.iterations_per_epoch = iterations_per_epoch
        self.loss_name = loss_name
        self.on_epoch = on_epoch
        self.class_margin_bound_degrees = math.degrees(
            class_margin_upper_bound(num_classes, embedding_size)
        )
        self.sample_margin_bound = sample_margin_upper_bound(num_classes)
        self.history: list[EpochMargins] = []
        self._watched: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._reset()

    # --- per batch -------------------------------------------------------------------------

    def update(
        self,
        loss_fn: torch.nn.Module,
        embeddings: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> None:
        """Add the batch the loss has just seen.

        Reads ``target_cosines``, ``target_labels`` and ``batch_sample_margins`` when the loss
        recorded them (and marks them read, so a second call without a new batch is an error);
        otherwise measures ``embeddings`` and ``labels`` against ``loss_fn.W`` (one (N, C)
        product). Either way the batch's tensors are kept as they are, on their device, and
        reduced at the next fold (every 64 batches and at the epoch's end): a recorded batch
        costs no copy to the host (a measured one, its label-range check).

        Raises:
            ValueError: the loss recorded nothing new and no embeddings and labels were given,
                or they do not fit the monitor's ``num_classes`` / ``embedding_size``; at a fold,
                NaN/Inf sample margins (NaN/Inf in a batch's embeddings or in ``W``) or a label
                not below ``num_classes``.
        """
        target = getattr(loss_fn, "target_cosines", None)
        if isinstance(target, torch.Tensor):
            labels, margins = loss_fn.target_labels, loss_fn.batch_sample_margins
            loss_fn.target_cosines = None
        elif embeddings is not None and labels is not None:
            target, margins = self._measure(loss_fn, embeddings, labels)
        else:
            raise ValueError(
                f"{type(loss_fn).__name__} recorded no new target cosines: build it with "
                "record_target_cosines=True (this package's losses) and call update once per "
                "forward, or pass the batch's embeddings and labels"
            )
        self._pending.append((target.detach(), labels.detach(), margins.detach()))
        self._batches += 1
        if len(self._pending) == _PENDING_BATCHES:
            self._fold()

    @torch.no_grad()
    def _measure(
        self, loss_fn: torch.nn.Module, embeddings: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's target cosines and sample margins (N,), against ``loss_fn.W``."""
        # Shapes and the label range here (the gather needs it); NaN/Inf at the fold, from the
        # margins, without another copy to the host per batch.
        check_embeddings(embeddings, finite=False)
        check_labels(labels, self.num_classes, embeddings.shape[0])
        W = getattr(loss_fn, "W", None)
        if not isinstance(W, torch.Tensor):
            raise TypeError(f"{type(loss_fn).__name__} has no prototypes W to measure against")
        check_prototypes(W, embedding_size=embeddings.shape[1], finite=False)
        self._check_columns(W)
        cosines = cosine_logits(embeddings.detach().to(W.dtype), W.detach())
        cosines = max_over_sub_centers(cosines, self.sub_centers)
        margins = sample_margins_from_cosines(cosines, labels)
        return cosines.gather(1, labels.long()[:, None]).squeeze(1), margins

    def _check_columns(self, W: torch.Tensor) -> None:
        """Refuse a ``W`` without ``num_classes · sub_centers`` columns."""
        expected = self.num_classes * self.sub_centers
        if W.shape[1] != expected:
            raise ValueError(
                f"W has {W.shape[1]} columns, the monitor expects {expected} "
                f"({self.num_classes} classes × {self.sub_centers} sub-centres)"
            )

    def _fold(self) -> None:
        """Fold the batches kept since the last call into the epoch's statistics: the sample
        margins' sum and minimum, and the angles per class.

        Raises:
            ValueError: NaN/Inf sample margins, or a label not below the monitor's
                ``num_classes``.
        """
        if not self._pending:
            return
        targets, labels, margins = (torch.cat(parts) for parts in zip(*self._pending, strict=True))
        self._pending.clear()
        if not labels.numel():
            return
        # One host copy for both (the sum in float64, as the epoch's mean is).
        total, low = torch.stack((margins.sum(dtype=torch.float64), margins.min())).tolist()
        if not (math.isfinite(total) and math.isfinite(low)):
            raise ValueError(
                "a batch has NaN or Inf sample margins: its embeddings or W contain NaN or Inf"
            )
        labels = labels.long().cpu()
        counts = torch.bincount(labels, minlength=self.num_classes)
        if counts.shape[0] > self.num_classes:  # bincount is as long as the largest label + 1
            raise ValueError(
                f"labels reach {counts.shape[0] - 1} but the monitor has {self.num_classes} classes"
            )
        angles = targets.double().clamp_(-1.0, 1.0).acos_().cpu()
        self._margin_sum += total
        self._margin_min = min(self._margin_min, low)
        self._num_samples += labels.numel()
        self._angle_sums.index_add_(0, labels, angles)
        self._angle_counts += counts
        self._angle_maxima.scatter_reduce_(0, labels, angles, reduce="amax")

    # --- per epoch -------------------------------------------------------------------------

    def end_epoch(self, W: torch.Tensor, epoch: int | None = None) -> EpochMargins:
        """Close the epoch: measure ``W`` (d, C) and the batches seen since the last call.

        ``epoch`` defaults to one more than the last recorded epoch.

        Raises:
            ValueError: no batch since the last epoch, or ``W`` of the wrong shape.
        """
        self._fold()
        if self._num_samples == 0:
            raise ValueError("no training batch was recorded since the last end_epoch")
        # Shape here; class_margin below refuses NaN/Inf (one scan of W, not two).
        check_prototypes(W, embedding_size=self.embedding_size, finite=False)
        self._check_columns(W)
        margin = class_margin(W, sub_centers=self.sub_centers)
        histogram = None
        # The histogram counts pairs of prototypes; with sub-centres it is not taken.
        if self.sub_centers == 1 and self.num_classes <= self.histogram_max_classes:
            histogram = prototype_cosine_histogram(W, self.histogram_bins)
        counts = self._angle_counts.double()
        means = (self._angle_sums / counts).rad2deg().tolist()  # 0/0 = nan for unseen classes
        maxima = self._angle_maxima.rad2deg().masked_fill(self._angle_counts == 0, math.nan)
        record = EpochMargins(
            epoch=len(self.history) + 1 if epoch is None else int(epoch),
            num_samples=self._num_samples,
            class_margin_degrees=margin.degrees,
            closest_pair=margin.closest_pair,
            class_margin_bound_degrees=self.class_margin_bound_degrees,
            mean_sample_margin=self._margin_sum / self._num_samples,
            min_sample_margin=self._margin_min,
            sample_margin_bound=self.sample_margin_bound,
            class_mean_angle_degrees=means,
            class_max_angle_degrees=maxima.tolist(),
            cosine_histogram=histogram,
        )
        self.history.append(record)
        self._reset()
        if self.on_epoch is not None:
            self.on_epoch(record)
        return record

    def _reset(self) -> None:
        self._margin_sum, self._margin_min, self._num_samples = 0.0, math.inf, 0
        self._batches = 0
        # (target cosines, labels, sample margins) of each batch since the last fold.
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._angle_sums = torch.zeros(self.num_classes, dtype=torch.float64)
        self._angle_counts = torch.zeros(self.num_classes, dtype=torch.int64)
        self._angle_maxima = torch.full((self.num_classes,), -math.inf, dtype=torch.float64)

    # --- PML trainer hooks -----------------------------------------------------------------

    def watch(self, loss_fn: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
        """Keep each batch's ``(embeddings, labels)`` given to ``loss_fn`` for the iteration hook.

        Only needed for a loss that does not record target cosines; returns the hook's handle.
        """

        def keep_inputs(module, inputs):
            if len(inputs) >= 2 and isinstance(inputs[1], torch.Tensor):
                self._watched[id(module)] = (inputs[0].detach(), inputs[1].detach())

        return loss_fn.register_forward_pre_hook(keep_inputs)

    def end_of_iteration_hook(self, trainer: BaseTrainer) -> None:
        """PML's ``end_of_iteration_hook``: add the batch; close an epoch every
        ``iterations_per_epoch`` batches if that was set."""
        loss_fn = trainer.loss_funcs[self.loss_name]
        self.update(loss_fn, *self._watched.pop(id(loss_fn), (None, None)))
        if self.iterations_per_epoch is not None and self._batches == self.iterations_per_epoch:
            self.end_epoch(loss_fn.W)

    def end_of_epoch_hook(self, trainer: BaseTrainer) -> bool:
        """PML's ``end_of_epoch_hook``: close the trainer's epoch (if batches are pending).
        Returns True, so training goes on."""
        self._fold()
        if self._num_samples:
            epoch = None if self.iterations_per_epoch is not None else trainer.epoch
            self.end_epoch(trainer.loss_funcs[self.loss_name].W, epoch)
        return True

    # --- output ----------------------------------------------------------------------------

    def as_dict(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "embedding_size": self.embedding_size,
            "class_margin_bound_degrees": self.class_margin_bound_degrees,
            "sample_margin_bound": self.sample_margin_bound,
            "histogram": {
                "edges": torch.linspace(-1.0, 1.0, self.histogram_bins + 1).tolist(),
                "max_classes": self.histogram_max_classes,
                "drawn": self.num_classes <= self.histogram_max_classes,
            },
            "epochs": [record.as_dict() for record in self.history],
        }

    def write_csv(self, path: Path) -> None:
        """One row per epoch with the scalar columns ``CSV_COLUMNS``."""
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for record in self.history:
                writer.writerow(record.csv_row())

    def write_json(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.as_dict(), indent=2) + "\n")

    def plot(self, path: Path) -> None:
        """Class margin, sample margins and angles to the prototypes per epoch, with the
        bounds, and the prototype cosines of the first and last epoch (matplotlib)."""
        from .plotting import pyplot

        if not self.history:
            raise ValueError("no epoch recorded yet")
        plt = pyplot()
        epochs = [record.epoch for record in self.history]
        figure, axes = plt.subplots(1, 4, figsize=(17, 3.8), constrained_layout=True)
        axes[0].plot(epochs, [r.class_margin_degrees for r in self.history], marker=".")
        axes[0].axhline(self.class_margin_bound_degrees, color="k", ls="--", label="bound")
        axes[0].set_ylabel("class margin of W (degrees)")
        axes[1].plot(epochs, [r.mean_sample_margin for r in self.history], label="mean γ")
        axes[1].plot(epochs, [r.min_sample_margin for r in self.history], label="min γ")
        axes[1].axhline(self.sample_margin_bound, color="k", ls="--", label="C/(C−1)")
        axes[1].set_ylabel("training sample margin γ")
        axes[2].plot(
            epochs, [r.mean_angle_to_prototype_degrees for r in self.history], label="mean"
        )
        axes[2].plot(epochs, [r.max_angle_to_prototype_degrees for r in self.history], label="max")
        axes[2].set_ylabel("angle to own prototype (degrees)")
        for axis in axes[:3]:
            axis.set_xlabel("epoch")
            axis.legend(fontsize=8)
        edges = self.as_dict()["histogram"]["edges"]
        drawn = False
        for record, name in ((self.history[0], "first"), (self.history[-1], "last")):
            if record.cosine_histogram is not None:
                axes[3].stairs(
                    record.cosine_histogram, edges, label=f"epoch {record.epoch} ({name})"
                )
                drawn = True
        if drawn:
            simplex = -1.0 / (self.num_classes - 1)
            axes[3].axvline(simplex, color="k", ls="--", label="−1/(C−1)")
            axes[3].legend(fontsize=8)
        else:
            axes[3].set_title(f"not drawn above {self.histogram_max_classes} classes", fontsize=8)
        axes[3].set_xlabel("cosine between prototypes")
        axes[3].set_ylabel("pairs")
        figure.savefig(path, dpi=80)
        plt.close(figure)

    def save(self, directory: Path, name: str = "margins", plot: bool = True) -> list[Path]:
        """``name``.csv, ``name``.json and (``plot``) ``name``.png in ``directory``; their paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = [directory / f"{name}.csv", directory / f"{name}.json"]
        self.write_csv(paths[0])
        self.write_json(paths[1])
        if plot:
            paths.append(directory / f"{name}.png")
            self.plot(paths[2])
        return paths
