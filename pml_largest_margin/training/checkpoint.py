"""Save and resume a training run: network, prototypes, optimisers, schedulers and epoch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .._pml import BaseTrainer


__all__ = [
    "BEST_CHECKPOINT_NAME",
    "CHECKPOINT_NAME",
    "load_checkpoint",
    "read_checkpoint",
    "restore",
    "save_checkpoint",
]

# The state after the latest finished epoch, and after the epoch with the best metric.
CHECKPOINT_NAME = "last.pt"
BEST_CHECKPOINT_NAME = "best.pt"


def save_checkpoint(
    path: Path, trainer: BaseTrainer, settings: dict, extra: dict | None = None
) -> None:
    """Everything needed to go on after ``trainer.epoch``; written atomically (temp + rename).

    ``extra`` (JSON-able values: the history and best metric so far) is stored beside it.
    """
    state = {
        "epoch": int(trainer.epoch),
        "settings": settings,
        "models": {name: model.state_dict() for name, model in trainer.models.items()},
        "loss": trainer.loss_funcs["metric_loss"].state_dict(),
        "optimizers": {name: opt.state_dict() for name, opt in trainer.optimizers.items()},
        "schedulers": {name: s.state_dict() for name, s in trainer.lr_schedulers.items()},
        # The next epoch's shuffling and augmentation draw from it: a resumed run repeats them.
        "rng": torch.get_rng_state(),
        **(extra or {}),
    }
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    temporary.replace(path)


def read_checkpoint(path: Path) -> dict:
    """The saved state of ``path``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a checkpoint this package wrote.
    """
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or foreign files
        raise ValueError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(state, dict) or not {"settings", "models", "epoch"} <= set(state):
        raise ValueError(f"{path} is not a checkpoint written by pml-lm train")
    return state


def load_checkpoint(path: Path, settings: dict) -> dict:
    """The saved state, after checking it was made with the same ``settings``.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: unreadable, or made with other settings (each differing one is named
            with its saved and its current value).
    """
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from at {path}")
    state = read_checkpoint(path)
    saved = state["settings"]
    differing = sorted(key for key in {*settings, *saved} if saved.get(key) != settings.get(key))
    if differing:
        details = ", ".join(
            f"{key}: {saved.get(key)!r} there, {settings.get(key)!r} now" for key in differing
        )
        raise ValueError(
            f"checkpoint {path} was made with different settings ({details}); "
            "use another --output-dir or the same options"
        )
    return state


def restore(trainer: BaseTrainer, state: dict) -> int:
    """Load ``state`` into ``trainer``; returns the first epoch still to run."""
    for name, model in trainer.models.items():
        model.load_state_dict(state["models"][name])
    trainer.loss_funcs["metric_loss"].load_state_dict(state["loss"])
    for name, optimizer in trainer.optimizers.items():
        optimizer.load_state_dict(state["optimizers"][name])
    for name, scheduler in trainer.lr_schedulers.items():
        scheduler.load_state_dict(state["schedulers"][name])
    torch.set_rng_state(state["rng"])
    return state["epoch"] + 1
