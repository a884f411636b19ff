"""``pml-lm train``: read a dataset, train a backbone with a margin loss, checkpoint, evaluate.

Everything a run can refuse (data, options, device, output folder) is checked before the
output folder is created or training starts.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from evaluation.defaults import DEFAULT_RANKS

from ..margin_monitor import MarginMonitor
from ..prototypes import freeze_prototypes
from .backbones import build_backbone
from .checkpoint import (
    BEST_CHECKPOINT_NAME,
    CHECKPOINT_NAME,
    load_checkpoint,
    read_checkpoint,
    restore,
    save_checkpoint,
)
from .embedding_metrics import (
    classification_metrics,
    embed,
    retrieval_metrics,
    verification_metrics,
)
from .fixed_prototypes import load_fixed_prototypes
from .image_dataset import ImageDataset, check_images
from .image_folder import read_image_folder, stratified_holdout
from .loss_factory import build_loss
from .market_layout import detect_reid_layout, read_reid_layout
from .options import (
    LAYOUTS,
    LOWER_IS_BETTER,
    TrainOptions,
    default_best_metric,
    evaluated_metrics,
)
from .paths import check_can_create
from .trainer import build_trainer, iterations_per_epoch, run_epochs

__all__ = ["LAYOUTS", "RUN_FILES", "TrainOptions", "resolve_device", "run_training"]

HISTORY_CSV, HISTORY_JSON, LOG_NAME, CONFIG_NAME = (
    "history.csv",
    "history.json",
    "train.log",
    "config.toml",
)
METRICS_NAME = "metrics.json"
# What a run writes into its output folder; --overwrite removes these and nothing else.
RUN_FILES = (
    CHECKPOINT_NAME,
    BEST_CHECKPOINT_NAME,
    HISTORY_CSV,
    HISTORY_JSON,
    LOG_NAME,
    CONFIG_NAME,
    METRICS_NAME,
    "margins.csv",
    "margins.json",
    "margins.png",
)
_HISTORY_COLUMNS = ("epoch", "loss", "lr", "seconds", "class_margin_degrees", "mean_sample_margin")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"unknown device {name!r}") from error


def _loader(paths, labels, image_size, workers: int, batch_size: int = 64):
    dataset = ImageDataset(paths, labels, image_size)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)


def _has_repeated_label(labels: np.ndarray) -> bool:
    return bool(np.bincount(labels).max(initial=0) >= 2)


def _evaluate_held_out(model, loss, held_out, options, device, workers) -> dict:
    """Accuracy and margins on the held-out images; retrieval and verification among them."""
    loader = _loader(held_out.paths, held_out.labels, options.image_size, workers)
    embeddings = embed(model, loader, device)
    labels = torch.as_tensor(held_out.labels)
    metrics = classification_metrics(embeddings, labels, loss)
    if _has_repeated_label(held_out.labels):
        metrics.update(retrieval_metrics(embeddings, labels))
        metrics.update(verification_metrics(embeddings, labels)[0])
    metrics.pop("per_class_accuracy", None)
    return metrics


def _evaluate_reid(model, query, gallery, options, device, workers) -> dict:
    from evaluation.reid import evaluate_reid

    features = [
        embed(model, _loader(part.paths, part.pids, options.image_size, workers), device).numpy()
        for part in (query, gallery)
    ]
    result = evaluate_reid(
        *features, query.pids, gallery.pids, query.camids, gallery.camids, metric="cosine"
    )
    metrics = {f"rank{k}": result.rank(k) for k in DEFAULT_RANKS if k <= len(result.cmc)}
    metrics.update(
        mAP=float(result.mAP),
        mINP=float(result.mINP),
        num_valid_queries=int(result.num_valid_queries),
        num_skipped_queries=int(result.num_skipped_queries),
    )
    return metrics


@dataclass
class _Data:
    """The resolved layout, training images and what evaluation runs on."""

    layout: str
    train: object
    held_out: object = None
    query: object = None
    gallery: object = None

    @property
    def is_reid(self) -> bool:
        return self.layout != "image-folder"

    def summary(self) -> str:
        train = self.train
        counts = np.bincount(train.labels)
        head = (
            f"dataset {self.layout}: {len(train.class_names)} "
            f"{'identities' if self.is_reid else 'classes'}, {len(train.paths)} training images "
            f"({counts.min()}–{counts.max()} per class)"
        )
        if self.is_reid:
            parts = [
                f"{name} {len(split)} images of {len(np.unique(split.pids))} identities"
                for name, split in (("query", self.query), ("gallery", self.gallery))
            ]
            return f"{head}; {', '.join(parts)}"
        return f"{head}; {len(self.held_out.paths)} held out for evaluation"


def _read_data(options: TrainOptions) -> _Data:
    root = Path(options.data)
    layout = options.layout
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = (root.is_dir() and detect_reid_layout(root)) or "image-folder"
    if layout != "image-folder":
        train, query, gallery = read_reid_layout(root, layout)
        check_images(train.paths + [Path(path) for path in query.paths + gallery.paths])
        return _Data(layout, train, query=query, gallery=gallery)
    images = read_image_folder(root)
    train_indices, held_out_indices = stratified_holdout(
        images.labels, options.held_out_fraction, options.seed
    )
    data = _Data(layout, images.subset(train_indices), held_out=images.subset(held_out_indices))
    check_images(data.train.paths + data.held_out.paths)
    return data


def _check_output_dir(output_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an output folder that holds another run (unless resumed or overwritten) or that
    cannot be created or written."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if output_dir.exists():
        if not output_dir.is_dir():
            raise ValueError(f"--output-dir {output_dir} exists and is not a directory")
        taken = [name for name in RUN_FILES if (output_dir / name).exists()]
        if taken and not (resume or overwrite):
            raise ValueError(
                f"--output-dir {output_dir} already holds a run ({', '.join(taken[:3])}); "
                "pass --resume to go on with it or --overwrite to replace it"
            )
    if not output_dir.exists():
        check_can_create(output_dir, "--output-dir")


def _format_duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def _format_value(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


class _RunRecord:
    """The history, best metric and log of a run, kept in its output folder as it goes."""

    def __init__(self, output_dir: Path, metric_names, best_metric: str, echo, state=None):
        self.output_dir = output_dir
        self.columns = list(_HISTORY_COLUMNS) + list(metric_names)
        self.best_metric = best_metric
        self.echo = echo
        self.history: list[dict] = list(state.get("history", [])) if state else []
        self.best: dict | None = state.get("best") if state else None
        self._log = (output_dir / LOG_NAME).open("a" if state else "w", encoding="utf-8")

    def line(self, text: str) -> None:
        self.echo(text)
        self.log(text)

    def log(self, text: str) -> None:
        self._log.write(text + "\n")
        self._log.flush()

    def close(self) -> None:
        self._log.close()

    def improves(self, metrics: dict) -> bool:
        value = metrics[self.best_metric]
        if isinstance(value, float) and math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.best_metric in LOWER_IS_BETTER:
            return value < self.best["value"]
        return value > self.best["value"]

    def extra(self) -> dict:
        return {"history": self.history, "best": self.best}

    def write_history(self) -> None:
        with (self.output_dir / HISTORY_CSV).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.history)
        (self.output_dir / HISTORY_JSON).write_text(
            json.dumps({"best": self.best, "epochs": self.history}, indent=2) + "\n"
        )


def _epoch_line(row: dict, total_epochs: int, eta: float) -> str:
    return (
        f"epoch {row['epoch']}/{total_epochs}: loss {row['loss']:.4f}, lr {row['lr']:.3g}, "
        f"{row['seconds']:.1f} s, ETA {_format_duration(eta)}; class margin "
        f"{row['class_margin_degrees']:.2f}°, mean sample margin {row['mean_sample_margin']:.3f}"
    )


def run_training(
    options: TrainOptions,
    output_dir: Path,
    *,
    resume: bool,
    device: str,
    workers: int,
    overwrite: bool = False,
    effective_config: str | None = None,
    echo: Callable[[str], object] = print,
    progress_bar: bool = False,
) -> dict:
    """Train, checkpointing every epoch into ``output_dir``, evaluating every
    ``options.eval_every`` epochs and after the last; returns the final report.

    ``output_dir`` gets ``last.pt`` (after every epoch), ``best.pt`` (the evaluated epoch with
    the best ``best_metric``), ``history.csv`` / ``history.json`` (per epoch: mean training
    loss, learning rate, seconds, training margins, the metrics where evaluated),
    ``train.log`` (every line ``echo`` gets), ``config.toml`` (``effective_config``),
    ``metrics.json`` (the final metrics, the best epoch and the software and machine), and the
    margin monitor's ``margins.csv`` / ``margins.json`` (``margins.png`` with matplotlib), which
    cover the epochs of this call only. An interrupt (KeyboardInterrupt) is re-raised with a
    message saying which epoch ``last.pt`` holds (also written to the log). If the call fails before any checkpoint exists,
    an output folder it created is removed.

    Raises:
        ValueError, OSError: bad data or options, a checkpoint that does not match, an output
            folder that holds another run (without ``resume`` or ``overwrite``).
    """
    _check_output_dir(output_dir, resume=resume, overwrite=overwrite)
    data = _read_data(options)
    if options.image_size is None:
        options = replace(options, image_size=(256, 128) if data.is_reid else (64, 64))
    metric_names = evaluated_metrics(
        data.layout, data.is_reid or _has_repeated_label(data.held_out.labels)
    )
    best_metric = options.best_metric or default_best_metric(data.layout)
    if best_metric not in metric_names:
        raise ValueError(
            f"--best-metric {best_metric!r} is not evaluated on this dataset; choose one of "
            f"{', '.join(metric_names)}"
        )
    options = replace(options, best_metric=best_metric)
    torch_device = resolve_device(device)
    num_classes = len(data.train.class_names)
    model, loss = _model_and_loss(options, data)
    iterations_per_epoch(len(data.train.paths), options.schedule.batch_size)
    settings = {**options.settings(), "layout": data.layout, "num_classes": num_classes}
    checkpoint_path = output_dir / CHECKPOINT_NAME
    state = load_checkpoint(checkpoint_path, settings) if resume else None
    if state is not None and state["epoch"] > options.schedule.epochs:
        raise ValueError(
            f"--epochs {options.schedule.epochs} is fewer than the {state['epoch']} epochs "
            f"{checkpoint_path} has trained; pass --epochs {state['epoch']} or more"
        )

    # The outermost folder this call creates, removed again if the run fails before a save.
    created = None
    for folder in (output_dir, *output_dir.parents):
        if folder.exists():
            break
        created = folder
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        if overwrite:
            for name in RUN_FILES:
                (output_dir / name).unlink(missing_ok=True)
        record = _RunRecord(output_dir, metric_names, best_metric, echo, state)
        try:
            return _train(
                options,
                data,
                model,
                loss,
                output_dir,
                settings,
                state,
                record,
                torch_device,
                workers,
                effective_config,
                progress_bar,
            )
        finally:
            record.close()
    except BaseException:
        if created is not None and not checkpoint_path.exists():
            shutil.rmtree(created, ignore_errors=True)
        raise


def _model_and_loss(options: TrainOptions, data: _Data):
    """The network and the loss (its prototypes frozen if asked), from ``options.seed``."""
    num_classes = len(data.train.class_names)
    torch.manual_seed(options.seed)
    model = build_backbone(options.backbone, options.embedding_size, options.pretrained)
    loss = build_loss(
        options.loss,
        num_classes,
        options.embedding_size,
        scale=options.scale,
        margin=options.margin,
        sample_margin_weight=options.sample_margin_weight,
        zero_centroid_weight=options.zero_centroid_weight,
        class_counts=np.bincount(data.train.labels, minlength=num_classes).tolist(),
        zero_centroid_form=options.zero_centroid_form,
        record_margins=True,
        sub_centers=options.sub_centers,
    )
    if options.fixed_prototypes is not None:
        freeze_prototypes(
            loss,
            load_fixed_prototypes(options.fixed_prototypes, num_classes, options.embedding_size),
        )
    return model, loss


def _train(
    options,
    data,
    model,
    loss,
    output_dir,
    settings,
    state,
    record,
    torch_device,
    workers,
    config,
    bar,
) -> dict:
    from pml_largest_margin.cli.environment import environment_record

    if config is not None:
        (output_dir / CONFIG_NAME).write_text(config)
    record.line(data.summary())
    num_classes = len(data.train.class_names)
    monitor = MarginMonitor(
        num_classes, options.embedding_size, sub_centers=getattr(loss, "sub_centers", 1)
    )
    if not getattr(loss, "record_target_cosines", False):
        monitor.watch(loss)
    schedule = options.schedule
    epoch_losses: list[float] = []
    timing = {"epoch_start": time.perf_counter(), "seconds": []}

    def evaluate() -> dict:
        # Evaluation draws no training randomness (the loaders' seeds come from torch's RNG).
        with torch.random.fork_rng(devices=[]):
            if data.is_reid:
                return _evaluate_reid(
                    model, data.query, data.gallery, options, torch_device, workers
                )
            return _evaluate_held_out(model, loss, data.held_out, options, torch_device, workers)

    def end_of_iteration(trainer) -> None:
        monitor.end_of_iteration_hook(trainer)
        epoch_losses.append(float(trainer.losses["total_loss"]))

    def end_of_epoch(trainer) -> None:
        monitor.end_of_epoch_hook(trainer)
        margins = monitor.history[-1]
        row = {
            "epoch": int(trainer.epoch),
            "loss": float(np.mean(epoch_losses)),
            "lr": float(trainer.optimizers["trunk_optimizer"].param_groups[0]["lr"]),
            "seconds": round(time.perf_counter() - timing["epoch_start"], 3),
            "class_margin_degrees": margins.class_margin_degrees,
            "mean_sample_margin": margins.mean_sample_margin,
        }
        epoch_losses.clear()
        metrics, is_best = None, False
        if trainer.epoch == schedule.epochs or (
            options.eval_every and trainer.epoch % options.eval_every == 0
        ):
            metrics = evaluate()
            row.update(metrics)
            is_best = record.improves(metrics)
            if is_best:
                record.best = {
                    "metric": record.best_metric,
                    "value": metrics[record.best_metric],
                    "epoch": row["epoch"],
                }
        # The ETA counts evaluations too: the mean wall time of this call's epochs.
        timing["seconds"].append(time.perf_counter() - timing["epoch_start"])
        eta = float(np.mean(timing["seconds"])) * (schedule.epochs - trainer.epoch)
        record.line(_epoch_line(row, schedule.epochs, eta))
        if metrics is not None:
            shown = ", ".join(f"{name} {_format_value(metrics[name])}" for name in metrics)
            record.line(f"  evaluation after epoch {row['epoch']}: {shown}{' (best)' * is_best}")
        record.history.append(row)
        save_checkpoint(output_dir / CHECKPOINT_NAME, trainer, settings, record.extra())
        if is_best:
            shutil.copyfile(output_dir / CHECKPOINT_NAME, output_dir / BEST_CHECKPOINT_NAME)
        record.write_history()
        timing["epoch_start"] = time.perf_counter()

    trainer = build_trainer(
        model,
        loss,
        ImageDataset(data.train.paths, data.train.labels, options.image_size, flip=True),
        schedule,
        device=torch_device,
        num_workers=workers,
        end_of_iteration_hook=end_of_iteration,
        end_of_epoch_hook=end_of_epoch,
    )
    start_epoch = restore(trainer, state) if state is not None else 1
    if start_epoch > 1:
        record.line(f"resumed after epoch {start_epoch - 1} from {output_dir / CHECKPOINT_NAME}")
    try:
        if start_epoch <= schedule.epochs:
            timing["epoch_start"] = time.perf_counter()
            run_epochs(trainer, start_epoch, schedule.epochs, progress_bar=bar)
    except KeyboardInterrupt:
        # What last.pt holds, read back: the interrupt may have come during or after a save.
        checkpoint = output_dir / CHECKPOINT_NAME
        done = read_checkpoint(checkpoint)["epoch"] if checkpoint.is_file() else 0
        record.history = [row for row in record.history if row["epoch"] <= done]
        if done:
            record.write_history()
        message = f"interrupted in epoch {done + 1}/{schedule.epochs}: " + (
            f"{checkpoint} holds epoch {done}; --resume goes on from there"
            if done
            else "no epoch had finished, nothing saved"
        )
        record.log(message)
        # The command line prints the interrupt's message as its one last line.
        raise KeyboardInterrupt(message) from None
    if monitor.history:
        monitor.save(output_dir, plot=importlib.util.find_spec("matplotlib") is not None)

    final = record.history[-1] if record.history else {}
    metrics = {name: final[name] for name in final if name not in _HISTORY_COLUMNS}
    if not metrics or final.get("epoch") != schedule.epochs:
        metrics = evaluate()
    report = {
        "settings": settings,
        "epochs": schedule.epochs,
        "device": str(torch_device),
        "environment": environment_record(str(torch_device)),
        "metrics": metrics,
        "best": record.best,
    }
    (output_dir / METRICS_NAME).write_text(json.dumps(report, indent=2) + "\n")
    record.line(
        f"trained on {torch_device}; last.pt, best.pt, history and metrics.json in {output_dir}"
    )
    return report
