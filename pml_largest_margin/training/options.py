"""What a ``pml-lm train`` run is made of, in a module without torch (the parser reads it).

The metric names are those :mod:`.embedding_metrics` and the re-ID evaluation report; which
of them a run has depends on its layout (:func:`evaluated_metrics`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .schedule import Schedule

__all__ = [
    "DEFAULT_DEVICE",
    "DEFAULT_EMBED_BATCH_SIZE",
    "DEFAULT_EMBED_WORKERS",
    "DEFAULT_MAX_PAIRS",
    "DEFAULT_WORKERS",
    "LAYOUTS",
    "LOWER_IS_BETTER",
    "TrainOptions",
    "default_best_metric",
    "evaluated_metrics",
]

LAYOUTS = ("auto", "image-folder", "market1501", "msmt17")
# How commands run rather than what a run is (not checkpoint settings).
DEFAULT_DEVICE = "auto"
DEFAULT_WORKERS = 2
# pml-lm embed on an image folder: all pairs up to this many (1,415 images), else a sample.
DEFAULT_MAX_PAIRS = 1_000_000
# pml-lm embed: images per forward pass, and data-loading processes (none: the main process).
DEFAULT_EMBED_BATCH_SIZE = 64
DEFAULT_EMBED_WORKERS = 0
REID_METRICS = ("mAP", "mINP", "rank1", "rank5", "rank10")
CLASSIFICATION_METRICS = (
    "accuracy",
    "class_margin_deg",
    "sample_margin_min",
    "sample_margin_mean",
)
# Among held-out images, only when a held-out class has two images.
PAIR_METRICS = ("mAP", "mINP", "rank1", "eer", "auc", "tar@far=0.01", "tar@far=0.001")
LOWER_IS_BETTER = frozenset({"eer"})


def evaluated_metrics(layout: str, held_out_has_pairs: bool = True) -> tuple[str, ...]:
    """The metrics an evaluation of a run on ``layout`` reports (a resolved layout, not auto)."""
    if layout != "image-folder":
        return REID_METRICS
    return CLASSIFICATION_METRICS + (PAIR_METRICS if held_out_has_pairs else ())


def default_best_metric(layout: str) -> str:
    """``mAP`` for a re-ID layout, ``accuracy`` for an image folder."""
    return "accuracy" if layout == "image-folder" else "mAP"


@dataclass(frozen=True)
class TrainOptions:
    """What a run is made of. Everything but ``data``, ``schedule.epochs`` (a resumed run may
    go on for more epochs) and ``eval_every`` must match a checkpoint to resume from it."""

    data: str
    layout: str = "auto"
    backbone: str = "small-cnn"
    pretrained: bool = False
    loss: str = "lm-softmax"
    scale: float | None = None  # None: the loss's default (loss_registry)
    margin: float | None = None  # None: the loss's default, in loss_registry's unit
    sub_centers: int = 1  # prototypes per class (lm-softmax, arcface)
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
    eval_every: int = 1  # epochs between evaluations; 0: after the last epoch only
    best_metric: str | None = None  # None: default_best_metric(layout)

    def __post_init__(self):
        # Checked here, before any work; the same rules hold where the values are used.
        if self.eval_every < 0:
            raise ValueError(f"--eval-every must be at least 0, got {self.eval_every}")
        if not (self.sample_margin_weight >= 0 and self.zero_centroid_weight >= 0):
            raise ValueError(
                "regularizer weights must be non-negative numbers, got "
                f"{self.sample_margin_weight}, {self.zero_centroid_weight}"
            )
        if not 0 < self.held_out_fraction < 1:
            raise ValueError(
                f"the held-out fraction must lie in (0, 1), got {self.held_out_fraction}"
            )

    def settings(self) -> dict:
        """The checkpoint-relevant options as plain JSON-able values (``schedule`` flattened
        into ``schedule.<field>`` keys so that a difference names the field)."""
        settings = asdict(self)
        for key in ("data", "eval_every", "schedule"):
            del settings[key]
        if self.sub_centers == 1:
            # Checkpoints written before sub-centres existed resume: 1 is what they hold.
            del settings["sub_centers"]
        settings["image_size"] = list(self.image_size) if self.image_size else None
        for key, value in self.schedule.as_dict().items():
            if key != "epochs":
                settings[f"schedule.{key}"] = value
        return settings
