"""Training through PML's ``MetricLossOnly`` trainer, the network and the loss's prototypes together."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from types import SimpleNamespace

import torch

# ``Schedule`` lives in a module without torch (the command line reads its defaults); this
# import keeps ``training.trainer.Schedule`` working.
from .._pml import base_trainer, trainers
from .schedule import Schedule, lr_factor


def iterations_per_epoch(dataset_size: int, batch_size: int) -> int:
    """Full batches per epoch (PML's loader drops the last partial batch)."""
    if dataset_size < batch_size:
        raise ValueError(
            f"the training set has {dataset_size} samples, fewer than the batch size {batch_size}"
        )
    return dataset_size // batch_size


def _optimizer(schedule: Schedule, parameters) -> torch.optim.Optimizer:
    if schedule.optimizer == "sgd":
        return torch.optim.SGD(
            parameters,
            lr=schedule.lr,
            momentum=schedule.momentum,
            weight_decay=schedule.weight_decay,
        )
    optimizer_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[schedule.optimizer]
    return optimizer_class(parameters, lr=schedule.lr, weight_decay=schedule.weight_decay)


def build_trainer(
    model: torch.nn.Module,
    loss: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    schedule: Schedule,
    *,
    device: torch.device,
    epochs_per_trainer_epoch: int = 1,
    num_workers: int = 0,
    end_of_iteration_hook: Callable[[trainers.MetricLossOnly], None] | None = None,
    end_of_epoch_hook: Callable[[trainers.MetricLossOnly], bool] | None = None,
) -> trainers.MetricLossOnly:
    """A ``MetricLossOnly`` trainer whose ``metric_loss_optimizer`` updates the loss's ``W``.

    PML draws one progress bar per trainer epoch; ``epochs_per_trainer_epoch = schedule.epochs``
    folds the whole schedule into one trainer epoch (one bar per run, as the demo wants: the loader
    is re-shuffled at the end of each pass over the data all the same).
    """
    model.to(device)
    loss.to(device)
    batches = iterations_per_epoch(len(dataset), schedule.batch_size)

    def factor(iteration: int) -> float:
        return lr_factor(schedule, iteration, batches)

    optimizers, schedulers = {}, {}
    for name, module in (("trunk", model), ("metric_loss", loss)):
        optimizer = _optimizer(schedule, module.parameters())
        optimizers[f"{name}_optimizer"] = optimizer
        schedulers[f"{name}_scheduler_by_iteration"] = torch.optim.lr_scheduler.LambdaLR(
            optimizer, factor
        )
    gradient_clippers = None
    if schedule.gradient_clip_norm is not None:
        parameters = [p for p in (*model.parameters(), *loss.parameters()) if p.requires_grad]
        gradient_clippers = {
            "trunk_grad_clipper": lambda: torch.nn.utils.clip_grad_norm_(
                parameters, schedule.gradient_clip_norm
            )
        }
    # PML warns about the optional keys (embedder, its optimiser) that this setup leaves out.
    pml_logger = logging.getLogger("PML")
    level = pml_logger.level
    pml_logger.setLevel(logging.ERROR)
    try:
        return trainers.MetricLossOnly(
            models={"trunk": model},
            optimizers=optimizers,
            lr_schedulers=schedulers,
            batch_size=schedule.batch_size,
            loss_funcs={"metric_loss": loss},
            dataset=dataset,
            iterations_per_epoch=batches * epochs_per_trainer_epoch,
            data_device=device,
            dataloader_num_workers=num_workers,
            gradient_clippers=gradient_clippers,
            end_of_iteration_hook=end_of_iteration_hook,
            end_of_epoch_hook=end_of_epoch_hook,
        )
    finally:
        pml_logger.setLevel(level)


class _EpochBar:
    """Stands in for the tqdm bar PML's trainer draws over each epoch's iterations: a bar
    labelled ``epoch k/n`` that goes away at the epoch's end, or nothing at all."""

    def __init__(self, iterations, label: str, show: bool):
        from tqdm import tqdm

        self._iterations = iterations
        self._bar = tqdm(iterations, desc=label, leave=False) if show else None

    def __iter__(self):
        return iter(self._iterations if self._bar is None else self._bar)

    def set_description(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text.replace("total_loss=", "loss "), refresh=False)


def run_epochs(
    trainer: trainers.MetricLossOnly,
    start_epoch: int,
    num_epochs: int,
    *,
    progress_bar: bool | None = None,
) -> None:
    """``trainer.train`` without the warning PML's progress bar triggers on every iteration.

    ``progress_bar`` None keeps PML's own bar; True replaces it by one labelled with the epoch
    (for a terminal); False draws none (the caller prints a line per epoch).
    """
    pml_tqdm = base_trainer.tqdm
    if progress_bar is not None:
        # PML calls ``tqdm.tqdm(range(iterations))`` after setting ``trainer.epoch``.
        base_trainer.tqdm = SimpleNamespace(
            tqdm=lambda iterations: _EpochBar(
                iterations, f"epoch {trainer.epoch}/{num_epochs}", progress_bar
            )
        )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True")
            trainer.train(start_epoch=start_epoch, num_epochs=num_epochs)
    finally:
        base_trainer.tqdm = pml_tqdm
