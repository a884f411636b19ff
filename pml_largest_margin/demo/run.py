"""Training and evaluating every method of the table, seed after seed."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..cli.progress import silenced_trainer_bar
from ..margin_monitor import EpochMargins, MarginMonitor
from ..training.embedding_metrics import (
    classification_metrics,
    embed,
    retrieval_metrics,
    verification_metrics,
)
from ..training.loss_factory import build_loss
from ..training.trainer import Schedule, build_trainer, iterations_per_epoch, run_epochs
from .data import DigitsSplit, long_tailed_subset
from .methods import DEMO_SETTINGS, EMBEDDING_SIZE, LossSettings, Method, embedding_network

# Called with (method, seed, the epoch's margins) after every epoch of every run.
EpochCallback = Callable[[Method, int, EpochMargins], object]
# Called with (method, seed) before a run starts.
StartCallback = Callable[[Method, int], object]
# Called with each run's result as it finishes (``resumed``: it came from ``finished``).
ResultCallback = Callable[["RunResult", bool], object]

# Accuracy on the classes rarest in the long-tailed training sets (the last three labels).
TAIL_CLASSES = (7, 8, 9)
# ROC curves are thinned to about this many points for the figures.
ROC_POINTS = 400


@dataclass
class RunResult:
    """The metrics of one (method, seed) run; the first seed also keeps what the figures need."""

    method: Method
    seed: int
    metrics: dict
    seconds: float
    prototype_cosines: np.ndarray | None = None
    roc: dict = field(default_factory=dict)
    training_margins: list[dict] = field(default_factory=list)
    monitor: MarginMonitor | None = None

    def as_dict(self) -> dict:
        """A JSON-ready record of the run (what :meth:`from_dict` reads back)."""
        cosines = self.prototype_cosines
        return {
            "method": self.method.label,
            "key": self.method.key,
            "seed": self.seed,
            "seconds": self.seconds,
            "metrics": self.metrics,
            "prototype_cosines": None if cosines is None else np.asarray(cosines).tolist(),
            "roc": self.roc,
            "training_margins": self.training_margins,
        }

    @classmethod
    def from_dict(cls, record: dict, method: Method) -> RunResult:
        """The run that :meth:`as_dict` wrote, for ``method`` (the row it belongs to)."""
        cosines = record["prototype_cosines"]
        return cls(
            method,
            record["seed"],
            record["metrics"],
            record["seconds"],
            None if cosines is None else np.asarray(cosines, dtype=np.float32),
            record["roc"],
            record["training_margins"],
        )


def _thin_roc(far: np.ndarray, tar: np.ndarray) -> dict:
    """A log-spaced subset of the ROC points (the curve is drawn on a log FAR axis)."""
    grid = np.geomspace(max(far[far > 0].min(), 1e-6), 1.0, ROC_POINTS)
    keep = np.unique(np.clip(np.searchsorted(far, grid), 0, len(far) - 1))
    return {"far": far[keep].tolist(), "tar": tar[keep].tolist()}


def run_one(
    method: Method,
    split: DigitsSplit,
    schedule: Schedule,
    seed: int,
    keep_artifacts: bool,
    *,
    network: Callable[[int], torch.nn.Module] = embedding_network,
    settings: LossSettings = DEMO_SETTINGS,
    on_epoch: EpochCallback | None = None,
) -> RunResult:
    """Train ``network`` with ``method`` from ``seed`` and evaluate it on the (balanced) test set.

    A :class:`MarginMonitor` records the training margins of every epoch (``training_margins``;
    with ``keep_artifacts`` the monitor itself is kept too, for its figure).
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    device = torch.device("cpu")
    model = network(EMBEDDING_SIZE)
    loss = build_loss(
        method.loss,
        split.num_classes,
        EMBEDDING_SIZE,
        scale=settings.scale,
        margin=settings.margins.get(method.loss),
        sample_margin_weight=method.sample_margin_weight,
        zero_centroid_weight=method.zero_centroid_weight,
        zero_centroid_form=settings.zero_centroid_form,
        record_margins=True,
    )
    dataset = torch.utils.data.TensorDataset(split.train_x, split.train_y)
    monitor = MarginMonitor(
        split.num_classes,
        EMBEDDING_SIZE,
        iterations_per_epoch=iterations_per_epoch(len(dataset), schedule.batch_size),
        on_epoch=None if on_epoch is None else lambda record: on_epoch(method, seed, record),
    )
    if not getattr(loss, "record_target_cosines", False):
        monitor.watch(loss)
    trainer = build_trainer(
        model,
        loss,
        dataset,
        schedule,
        device=device,
        epochs_per_trainer_epoch=schedule.epochs,
        end_of_iteration_hook=monitor.end_of_iteration_hook,
        end_of_epoch_hook=monitor.end_of_epoch_hook,
    )
    threads = torch.get_num_threads()
    # The command shows its own progress: one step per run, not PML's bar per run.
    with silenced_trainer_bar(trainer):
        run_epochs(trainer, 1, 1)
    embeddings = embed(model, split.test_x, device)
    metrics = classification_metrics(embeddings, split.test_y, loss)
    metrics["tail_accuracy"] = float(
        np.mean([metrics["per_class_accuracy"][c] for c in TAIL_CLASSES])
    )
    metrics.update(retrieval_metrics(embeddings, split.test_y))
    verification, curve = verification_metrics(embeddings, split.test_y)
    metrics.update(verification)
    # The evaluation's first numba / FAISS call can change torch's thread count (seen: 1 → 2),
    # which made the next run's convolutions 50× slower on a loaded two-core machine.
    torch.set_num_threads(threads)
    result = RunResult(method, seed, metrics, time.perf_counter() - start)
    result.training_margins = [record.csv_row() for record in monitor.history]
    if keep_artifacts:
        result.monitor = monitor
        unit = torch.nn.functional.normalize(loss.W.detach().float().cpu(), dim=0)
        result.prototype_cosines = (unit.t() @ unit).numpy()
        result.roc = _thin_roc(np.asarray(curve["far"]), np.asarray(curve["tar"]))
    return result


def run_all(
    methods: Sequence[Method],
    split: DigitsSplit,
    schedule: Schedule,
    seeds: Sequence[int],
    *,
    network: Callable[[int], torch.nn.Module] = embedding_network,
    settings: LossSettings = DEMO_SETTINGS,
    on_epoch: EpochCallback | None = None,
    on_start: StartCallback | None = None,
    on_result: ResultCallback | None = None,
    finished: Mapping[tuple[str, int], RunResult] | None = None,
) -> list[RunResult]:
    """Every method with every seed; the first seed's runs keep the figures' data.

    A run found in ``finished`` (by ``(method.key, seed)``, e.g. read back by ``--resume``) is
    taken as it is instead of trained again. ``on_result`` sees every run as it finishes, so a
    caller can save it at once.
    """
    finished = finished or {}
    splits = {1: split}
    results = []
    for method, seed in ((m, s) for m in methods for s in seeds):
        done = finished.get((method.key, seed))
        if done is None:
            if method.imbalance_ratio not in splits:
                splits[method.imbalance_ratio] = long_tailed_subset(split, method.imbalance_ratio)
            if on_start is not None:
                on_start(method, seed)
            done = run_one(
                method,
                splits[method.imbalance_ratio],
                schedule,
                seed,
                seed == seeds[0],
                network=network,
                settings=settings,
                on_epoch=on_epoch,
            )
        if on_result is not None:
            on_result(done, (method.key, seed) in finished)
        results.append(done)
    return results
