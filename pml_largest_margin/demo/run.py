"""Training and evaluating every method of the table, seed after seed."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import tqdm

from ..training.embedding_metrics import (
    classification_metrics,
    embed,
    retrieval_metrics,
    verification_metrics,
)
from ..training.loss_factory import build_loss
from ..training.trainer import Schedule, build_trainer, run_epochs
from .data import DigitsSplit, long_tailed_subset
from .methods import EMBEDDING_SIZE, SCALE, Method, embedding_network

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


def _thin_roc(far: np.ndarray, tar: np.ndarray) -> dict:
    """A log-spaced subset of the ROC points (the curve is drawn on a log FAR axis)."""
    grid = np.geomspace(max(far[far > 0].min(), 1e-6), 1.0, ROC_POINTS)
    keep = np.unique(np.clip(np.searchsorted(far, grid), 0, len(far) - 1))
    return {"far": far[keep].tolist(), "tar": tar[keep].tolist()}


def run_one(
    method: Method, split: DigitsSplit, schedule: Schedule, seed: int, keep_artifacts: bool
) -> RunResult:
    """Train the MLP with ``method`` from ``seed`` and evaluate it on the (balanced) test set."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    device = torch.device("cpu")
    model = embedding_network()
    loss = build_loss(
        method.loss,
        split.num_classes,
        EMBEDDING_SIZE,
        scale=SCALE,
        sample_margin_weight=method.sample_margin_weight,
        zero_centroid_weight=method.zero_centroid_weight,
    )
    dataset = torch.utils.data.TensorDataset(split.train_x, split.train_y)
    trainer = build_trainer(
        model, loss, dataset, schedule, device=device, epochs_per_trainer_epoch=schedule.epochs
    )
    run_epochs(trainer, 1, 1)
    embeddings = embed(model, split.test_x, device)
    metrics = classification_metrics(embeddings, split.test_y, loss)
    metrics["tail_accuracy"] = float(
        np.mean([metrics["per_class_accuracy"][c] for c in TAIL_CLASSES])
    )
    metrics.update(retrieval_metrics(embeddings, split.test_y))
    verification, curve = verification_metrics(embeddings, split.test_y)
    metrics.update(verification)
    result = RunResult(method, seed, metrics, time.perf_counter() - start)
    if keep_artifacts:
        unit = torch.nn.functional.normalize(loss.W.detach().float().cpu(), dim=0)
        result.prototype_cosines = (unit.t() @ unit).numpy()
        result.roc = _thin_roc(np.asarray(curve["far"]), np.asarray(curve["tar"]))
    return result


def run_all(
    methods: Sequence[Method], split: DigitsSplit, schedule: Schedule, seeds: Sequence[int]
) -> list[RunResult]:
    """Every method with every seed; the first seed's runs keep the figures' data."""
    splits = {1: split}
    results = []
    total = len(methods) * len(seeds)
    for index, (method, seed) in enumerate(((m, s) for m in methods for s in seeds), start=1):
        if method.imbalance_ratio not in splits:
            splits[method.imbalance_ratio] = long_tailed_subset(split, method.imbalance_ratio)
        tqdm.tqdm.write(f"[{index}/{total}] {method.label}, seed {seed}")
        results.append(
            run_one(method, splits[method.imbalance_ratio], schedule, seed, seed == seeds[0])
        )
    return results
