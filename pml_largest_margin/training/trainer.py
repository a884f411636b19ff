"""Training through PML's ``MetricLossOnly`` trainer, the network and the loss's prototypes together."""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass

import torch
from pytorch_metric_learning import trainers


@dataclass(frozen=True)
class Schedule:
    """One optimiser and learning-rate schedule, applied alike to the network and to ``W``.

    SGD with momentum and weight decay; the learning rate follows a cosine from ``lr`` to 0 over
    all iterations of ``epochs`` epochs (updated every iteration). ``gradient_clip_norm``, if set,
    clips the gradient norm of the network and ``W`` together before each step.
    """

    epochs: int = 60
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    gradient_clip_norm: float | None = None

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"epochs and batch size must be at least 1, got {self.epochs}, {self.batch_size}"
            )
        # Written so that NaN fails every test.
        if not (self.lr > 0 and 0 <= self.momentum < 1 and self.weight_decay >= 0):
            raise ValueError(
                "need lr > 0, 0 <= momentum < 1 and weight_decay >= 0, got "
                f"{self.lr}, {self.momentum}, {self.weight_decay}"
            )
        if self.gradient_clip_norm is not None and not self.gradient_clip_norm > 0:
            raise ValueError(f"gradient_clip_norm must be > 0, got {self.gradient_clip_norm}")

    def as_dict(self) -> dict:
        return asdict(self)


def iterations_per_epoch(dataset_size: int, batch_size: int) -> int:
    """Full batches per epoch (PML's loader drops the last partial batch)."""
    if dataset_size < batch_size:
        raise ValueError(
            f"the training set has {dataset_size} samples, fewer than the batch size {batch_size}"
        )
    return dataset_size // batch_size


def build_trainer(
    model: torch.nn.Module,
    loss: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    schedule: Schedule,
    *,
    device: torch.device,
    epochs_per_trainer_epoch: int = 1,
    num_workers: int = 0,
    end_of_iteration_hook=None,
    end_of_epoch_hook=None,
) -> trainers.MetricLossOnly:
    """A ``MetricLossOnly`` trainer whose ``metric_loss_optimizer`` updates the loss's ``W``.

    PML draws one progress bar per trainer epoch; ``epochs_per_trainer_epoch = schedule.epochs``
    folds the whole schedule into one trainer epoch (one bar per run, as the demo wants: the loader
    is re-shuffled at the end of each pass over the data all the same).
    """
    model.to(device)
    loss.to(device)
    batches = iterations_per_epoch(len(dataset), schedule.batch_size)
    total_iterations = batches * schedule.epochs

    def cosine(iteration: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * min(iteration, total_iterations) / total_iterations))

    optimizers, schedulers = {}, {}
    for name, module in (("trunk", model), ("metric_loss", loss)):
        optimizer = torch.optim.SGD(
            module.parameters(),
            lr=schedule.lr,
            momentum=schedule.momentum,
            weight_decay=schedule.weight_decay,
        )
        optimizers[f"{name}_optimizer"] = optimizer
        schedulers[f"{name}_scheduler_by_iteration"] = torch.optim.lr_scheduler.LambdaLR(
            optimizer, cosine
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


def run_epochs(trainer: trainers.MetricLossOnly, start_epoch: int, num_epochs: int) -> None:
    """``trainer.train`` without the warning PML's progress bar triggers on every iteration."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True")
        trainer.train(start_epoch=start_epoch, num_epochs=num_epochs)
