"""The optimiser and learning-rate schedule of a training run, as a plain dataclass.

Imports nothing heavy, so that the command line can take its defaults and choices from here
without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["ADAPTIVE_OPTIMIZER_LR", "LR_SCHEDULES", "OPTIMIZERS", "Schedule", "lr_factor"]

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "step")
# The learning rate ``pml-lm train`` uses for Adam and AdamW when none is given: the SGD rates
# of the recipes (0.05, 0.1) make them diverge.
ADAPTIVE_OPTIMIZER_LR = 1e-3
# The step schedule multiplies the learning rate by STEP_GAMMA at these fractions of the epochs.
STEP_FRACTIONS = (0.5, 0.75)
STEP_GAMMA = 0.1


@dataclass(frozen=True)
class Schedule:
    """One optimiser and learning-rate schedule, applied alike to the network and to ``W``.

    ``optimizer``: ``sgd`` (with ``momentum``), ``adam`` or ``adamw``; ``weight_decay`` is each
    optimiser's own (L2 for SGD and Adam, decoupled for AdamW). ``lr_schedule``: ``constant``;
    ``cosine`` from ``lr`` to 0; ``step``: ``lr`` times 0.1 at half and again at three quarters
    of the epochs. The schedule is updated every iteration; with ``warmup_epochs`` > 0 the
    learning rate first rises linearly to ``lr`` over that many epochs and the schedule then
    runs over the epochs that remain. ``gradient_clip_norm``, if set, clips the gradient norm
    of the network and ``W`` together before each step.
    """

    epochs: int = 60
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    gradient_clip_norm: float | None = None
    optimizer: str = "sgd"
    lr_schedule: str = "cosine"
    warmup_epochs: int = 0

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
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"lr schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}"
            )
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(
                f"warm-up epochs must lie in [0, epochs = {self.epochs}), got {self.warmup_epochs}"
            )

    def as_dict(self) -> dict:
        return asdict(self)


def lr_factor(schedule: Schedule, iteration: int, iterations_per_epoch: int) -> float:
    """The learning rate at ``iteration`` (0-based, over the whole run) divided by ``lr``.

    Warm-up: ``(iteration + 1) / warmup_iterations`` for the first
    ``warmup_epochs · iterations_per_epoch`` iterations. Then, with ``t`` the fraction of the
    remaining iterations done: 1 (constant), ``(1 + cos(π t)) / 2`` (cosine), or ``0.1^k``
    with ``k`` the number of ``STEP_FRACTIONS`` of the epochs passed (step).
    """
    warmup = schedule.warmup_epochs * iterations_per_epoch
    if iteration < warmup:
        return (iteration + 1) / warmup
    remaining = schedule.epochs * iterations_per_epoch - warmup
    done = min(iteration - warmup, remaining) / remaining
    if schedule.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * done))
    if schedule.lr_schedule == "step":
        epoch = iteration / iterations_per_epoch
        return STEP_GAMMA ** sum(epoch >= fraction * schedule.epochs for fraction in STEP_FRACTIONS)
    return 1.0
