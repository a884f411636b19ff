"""The demo's experiment table: which loss and regularizers, on which training distribution.

Light (torch is imported when a network is built): ``pml-lm demo --methods`` takes its choices
from here while the parser is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..training.recipes import Recipe

# Shared by every method, so that only the loss differs between rows of the table.
SCALE = 10.0
SAMPLE_MARGIN_WEIGHT = 0.5
# λ of the zero-centroid regularizer in its mean form λ·‖(1/C) Σ_j ŵ_j‖²; the authors' sum form
# ‖Σ_j ŵ_j‖² is C² = 100 times larger, so this λ equals 0.01 in the sum form.
ZERO_CENTROID_WEIGHT = 1.0
IMBALANCE_RATIOS = (10, 100)
EMBEDDING_SIZE = 32


@dataclass(frozen=True)
class Method:
    """One row of the table: a loss, its regularizer weights, and the training set's imbalance."""

    label: str
    loss: str
    sample_margin_weight: float = 0.0
    zero_centroid_weight: float = 0.0
    imbalance_ratio: int = 1

    @property
    def key(self) -> str:
        return self.label.lower().replace(" + ", "+").replace(" ", "-")


def _long_tailed(ratio: int) -> list[Method]:
    zc = ZERO_CENTROID_WEIGHT
    return [
        Method(f"NormFace LT{ratio}", "normface", imbalance_ratio=ratio),
        Method(
            f"NormFace + ZC LT{ratio}", "normface", zero_centroid_weight=zc, imbalance_ratio=ratio
        ),
        Method(f"LM-Softmax LT{ratio}", "lm-softmax", imbalance_ratio=ratio),
        Method(
            f"LM-Softmax + ZC LT{ratio}",
            "lm-softmax",
            zero_centroid_weight=zc,
            imbalance_ratio=ratio,
        ),
    ]


BALANCED_METHODS = (
    Method("Softmax CE", "softmax"),
    Method("NormFace", "normface"),
    Method("CosFace", "cosface"),
    Method("ArcFace", "arcface"),
    Method("LM-Softmax", "lm-softmax"),
    Method("AdaFace", "adaface"),
    Method("CurricularFace", "curricularface"),
    Method("MagFace", "magface"),
    Method("NormFace + R_sm", "normface", sample_margin_weight=SAMPLE_MARGIN_WEIGHT),
    Method("LM-Softmax + R_sm", "lm-softmax", sample_margin_weight=SAMPLE_MARGIN_WEIGHT),
)
LONG_TAILED_METHODS = tuple(m for ratio in IMBALANCE_RATIOS for m in _long_tailed(ratio))
ALL_METHODS = BALANCED_METHODS + LONG_TAILED_METHODS


@dataclass(frozen=True)
class LossSettings:
    """What every row shares: the scale, margins overriding the losses' defaults (units of
    ``build_loss``), and the form of the zero-centroid λ."""

    scale: float = SCALE
    margins: dict[str, float] = field(default_factory=dict)
    zero_centroid_form: str = "mean"


DEMO_SETTINGS = LossSettings()


def apply_recipe(methods: Sequence[Method], recipe: Recipe) -> tuple[list[Method], LossSettings]:
    """The rows and shared settings under ``recipe`` (``training.recipes``).

    ``package`` keeps the demo's own values (above). Another recipe sets the scale, margins and
    zero-centroid form, and gives every row that uses a regularizer the recipe's λ for it.
    """
    if recipe.name == "package":
        return list(methods), DEMO_SETTINGS
    weights = recipe.regularizer_weights
    rows = [
        replace(
            method,
            sample_margin_weight=weights["sample_margin"] if method.sample_margin_weight else 0.0,
            zero_centroid_weight=weights["zero_centroid"] if method.zero_centroid_weight else 0.0,
        )
        for method in methods
    ]
    return rows, LossSettings(recipe.scale, dict(recipe.margins), recipe.zero_centroid_form)


def embedding_network(embedding_size: int = EMBEDDING_SIZE) -> torch.nn.Sequential:
    """MLP 64-128-128-d with ReLU: small enough for CPU, deep enough to shape the embedding."""
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(64, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, embedding_size),
    )
