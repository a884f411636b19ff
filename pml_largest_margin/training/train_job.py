"""``pml-lm train``: read a dataset, train a backbone with a margin loss, checkpoint, evaluate."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..margin_monitor import EpochMargins, MarginMonitor
from ..prototypes import freeze_prototypes
from .backbones import build_backbone
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, restore, save_checkpoint
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
from .trainer import Schedule, build_trainer, run_epochs

LAYOUTS = ("auto", "image-folder", "market1501", "msmt17")


@dataclass(frozen=True)
class TrainOptions:
    """What a run is made of; everything but the paths, ``device`` and ``workers`` must match
    a checkpoint to resume from it."""

    data: str
    layout: str = "auto"
    backbone: str = "small-cnn"
    pretrained: bool = False
    loss: str = "lm-softmax"
    scale: float = 10.0
    margin: float | None = None
    sample_margin_weight: float = 0.0
    zero_centroid_weight: float = 0.0
    zero_centroid_form: str = "mean"
    fixed_prototypes: str | None = None  # a .npy file of W (embedding_size, num_classes), frozen
    recipe: str = "package"
    embedding_size: int = 128
    image_size: tuple[int, int] | None = None  # (64, 64) for image folders, (256, 128) for re-ID
    held_out_fraction: float = 0.2
    seed: int = 0
    schedule: Schedule = Schedule(epochs=10, batch_size=32, lr=0.05)

    def settings(self) -> dict:
        """The checkpoint-relevant options as plain JSON-able values."""
        settings = asdict(self)
        del settings["data"]
        settings["image_size"] = list(self.image_size) if self.image_size else None
        return settings


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"unknown device {name!r}") from error


def _loader(paths, labels, options: TrainOptions, workers: int):
    dataset = ImageDataset(paths, labels, options.image_size)
    return torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=workers)


def _has_repeated_label(labels: np.ndarray) -> bool:
    return bool(np.bincount(labels).max(initial=0) >= 2)


def _evaluate_held_out(model, loss, held_out, options, device, workers) -> dict:
    """Accuracy and margins on the held-out images; retrieval and verification among them."""
    embeddings = embed(model, _loader(held_out.paths, held_out.labels, options, workers), device)
    labels = torch.as_tensor(held_out.labels)
    metrics = classification_metrics(embeddings, labels, loss)
    if _has_repeated_label(held_out.labels):
        metrics.update(retrieval_metrics(embeddings, labels))
        metrics.update(verification_metrics(embeddings, labels)[0])
    return metrics


def _evaluate_reid(model, query, gallery, options, device, workers) -> dict:
    from evaluation.reid import evaluate_reid

    features = [
        embed(model, _loader(part.paths, part.pids, options, workers), device).numpy()
        for part in (query, gallery)
    ]
    result = evaluate_reid(
        *features, query.pids, gallery.pids, query.camids, gallery.camids, metric="cosine"
    )
    metrics = {f"rank{k}": result.rank(k) for k in (1, 5, 10) if k <= len(result.cmc)}
    metrics.update(
        mAP=float(result.mAP),
        mINP=float(result.mINP),
        num_valid_queries=int(result.num_valid_queries),
        num_skipped_queries=int(result.num_skipped_queries),
    )
    return metrics


def run_training(
    options: TrainOptions,
    output_dir: Path,
    *,
    resume: bool,
    device: str,
    workers: int,
    on_epoch: Callable[[EpochMargins], object] | None = None,
) -> dict:
    """Train, checkpointing every epoch into ``output_dir``, then evaluate; returns the metrics.

    A :class:`MarginMonitor` follows the training margins; ``on_epoch`` gets each epoch's
    record, and ``margins.csv`` / ``margins.json`` (and ``margins.png`` with matplotlib) are
    written next to the checkpoint. After ``resume`` they cover the epochs of this call only.
    """
    root = Path(options.data)
    layout = options.layout
    if layout == "auto":
        layout = (root.is_dir() and detect_reid_layout(root)) or "image-folder"
    reid_layout = layout != "image-folder"
    if options.image_size is None:
        options = replace(options, image_size=(256, 128) if reid_layout else (64, 64))
    if reid_layout:
        train, query, gallery = read_reid_layout(root, layout)
        evaluation_paths = [Path(path) for path in query.paths + gallery.paths]
    else:
        images = read_image_folder(root)
        train_indices, held_out_indices = stratified_holdout(
            images.labels, options.held_out_fraction, options.seed
        )
        train, held_out = images.subset(train_indices), images.subset(held_out_indices)
        evaluation_paths = held_out.paths
    check_images(train.paths + evaluation_paths)
    torch_device = resolve_device(device)
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = {**options.settings(), "layout": layout, "num_classes": len(train.class_names)}
    checkpoint_path = output_dir / CHECKPOINT_NAME

    torch.manual_seed(options.seed)
    model = build_backbone(options.backbone, options.embedding_size, options.pretrained)
    loss = build_loss(
        options.loss,
        len(train.class_names),
        options.embedding_size,
        scale=options.scale,
        margin=options.margin,
        sample_margin_weight=options.sample_margin_weight,
        zero_centroid_weight=options.zero_centroid_weight,
        class_counts=np.bincount(train.labels, minlength=len(train.class_names)).tolist(),
        zero_centroid_form=options.zero_centroid_form,
        record_margins=True,
    )
    if options.fixed_prototypes is not None:
        freeze_prototypes(
            loss,
            load_fixed_prototypes(
                options.fixed_prototypes, len(train.class_names), options.embedding_size
            ),
        )
    monitor = MarginMonitor(len(train.class_names), options.embedding_size, on_epoch=on_epoch)
    if not getattr(loss, "record_target_cosines", False):
        monitor.watch(loss)

    def end_of_epoch(trainer) -> None:
        monitor.end_of_epoch_hook(trainer)
        save_checkpoint(checkpoint_path, trainer, settings)

    trainer = build_trainer(
        model,
        loss,
        ImageDataset(train.paths, train.labels, options.image_size, flip=True),
        options.schedule,
        device=torch_device,
        num_workers=workers,
        end_of_iteration_hook=monitor.end_of_iteration_hook,
        end_of_epoch_hook=end_of_epoch,
    )
    start_epoch = restore(trainer, load_checkpoint(checkpoint_path, settings)) if resume else 1
    if start_epoch <= options.schedule.epochs:
        run_epochs(trainer, start_epoch, options.schedule.epochs)
    if monitor.history:
        monitor.save(output_dir, plot=importlib.util.find_spec("matplotlib") is not None)

    loss.cpu()
    if reid_layout:
        metrics = _evaluate_reid(model, query, gallery, options, torch_device, workers)
    else:
        metrics = _evaluate_held_out(model, loss, held_out, options, torch_device, workers)
    metrics.pop("per_class_accuracy", None)
    report = {"settings": settings, "device": str(torch_device), "metrics": metrics}
    (output_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
