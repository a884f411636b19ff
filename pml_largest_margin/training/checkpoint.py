"""Save and resume a training run: network, prototypes, optimisers, schedulers and epoch."""

from __future__ import annotations

from pathlib import Path

import torch

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(path: Path, trainer, settings: dict) -> None:
    """Everything needed to go on after ``trainer.epoch``; written atomically (temp + rename)."""
    state = {
        "epoch": int(trainer.epoch),
        "settings": settings,
        "models": {name: model.state_dict() for name, model in trainer.models.items()},
        "loss": trainer.loss_funcs["metric_loss"].state_dict(),
        "optimizers": {name: opt.state_dict() for name, opt in trainer.optimizers.items()},
        "schedulers": {name: s.state_dict() for name, s in trainer.lr_schedulers.items()},
        # The next epoch's shuffling and augmentation draw from it: a resumed run repeats them.
        "rng": torch.get_rng_state(),
    }
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    temporary.replace(path)


def load_checkpoint(path: Path, settings: dict) -> dict:
    """The saved state, after checking it was made with the same ``settings``."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or foreign files
        raise ValueError(f"cannot read checkpoint {path}: {error}") from error
    saved = state.get("settings") if isinstance(state, dict) else None
    if saved != settings:
        differing = sorted(k for k in settings if (saved or {}).get(k) != settings[k])
        raise ValueError(
            f"checkpoint {path} was made with different settings ({', '.join(differing)}); "
            "use another --output-dir or the same options"
        )
    return state


def restore(trainer, state: dict) -> int:
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
