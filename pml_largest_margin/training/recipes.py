"""Named training recipes: this package's defaults, and the values of the authors' training script.

A recipe fills in every option the user leaves out of ``pml-lm train`` (and the loss settings of
``pml-lm demo``): the scale, the margins of CosFace and ArcFace, the regularizer weights, the
optimiser, the schedule and gradient clipping.

``package`` (this package's defaults for ``pml-lm train``) against ``paper`` (the defaults of the
authors' visual-classification training script, read in copies of it published in public
repositories; the authors' own repository could not be located with our search tools):

=========================  =========================  =====================================
setting                    package                    paper
=========================  =========================  =====================================
scale s                    10                         5
CosFace margin             0.35                       0.1
ArcFace margin             0.5 rad (28.6°)            0.1 rad (5.73°)
zero-centroid λ            0 (off)                    5, sum form ‖Σ_j ŵ_j‖² (= 5·C² mean)
sample-margin λ            0 (off)                    0; the script's one λ = 5 serves R_sm
                                                      when chosen instead of R_w
optimiser                  SGD, momentum 0.9          SGD, momentum 0.9
weight decay               5e-4                       1e-4 (network and prototypes)
learning rate, schedule    0.05, cosine per iteration 0.1, cosine to 0 (per epoch there)
batch, epochs              32, 10                     256, 250
gradient clipping          none                       norm 5 (network and prototypes)
=========================  =========================  =====================================

The script's network (a CIFAR ResNet-34), data augmentation and data sets are not part of the
recipe. Its "fix" mode, training against prototypes loaded from a generated ``.npy`` file, is
``--fixed-prototypes`` here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .schedule import Schedule


@dataclass(frozen=True)
class Recipe:
    """One set of defaults. ``margins`` override ``loss_factory.DEFAULT_MARGINS``, in the units
    of ``loss_registry`` (angular margins in radians); ``zero_centroid_form`` says which form
    ``zero_centroid_weight`` is for."""

    name: str
    scale: float
    margins: dict[str, float]
    sample_margin_weight: float
    zero_centroid_weight: float
    zero_centroid_form: str
    schedule: Schedule
    # λ for each regularizer when it is used (the demo's "+ R_sm" and "+ ZC" rows); empty for
    # the package recipe, whose demo keeps its own values.
    regularizer_weights: dict[str, float] = field(default_factory=dict)
    description: str = field(default="", compare=False)

    def margin(self, loss: str) -> float | None:
        """The margin for ``loss``, or ``None`` for the loss's default (or no margin)."""
        return self.margins.get(loss)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "scale": self.scale,
            "margins": dict(self.margins),
            "sample_margin_weight": self.sample_margin_weight,
            "zero_centroid_weight": self.zero_centroid_weight,
            "zero_centroid_form": self.zero_centroid_form,
            "schedule": self.schedule.as_dict(),
            "regularizer_weights": dict(self.regularizer_weights),
        }


PACKAGE_RECIPE = Recipe(
    name="package",
    scale=10.0,
    margins={},  # loss_factory.DEFAULT_MARGINS: CosFace 0.35, ArcFace 0.5 rad, SphereFace 4
    sample_margin_weight=0.0,
    zero_centroid_weight=0.0,
    zero_centroid_form="mean",
    schedule=Schedule(epochs=10, batch_size=32, lr=0.05, momentum=0.9, weight_decay=5e-4),
    description=(
        "This package's defaults for pml-lm train: s = 10; CosFace m = 0.35, ArcFace m = 0.5 rad "
        "(28.6°), SphereFace m = 4 (the values of the CosFace and ArcFace papers); no "
        "regularizer; SGD lr 0.05, momentum 0.9, weight decay 5e-4, batch 32, 10 epochs, cosine "
        "decay to 0 updated every iteration; no gradient clipping."
    ),
)

PAPER_RECIPE = Recipe(
    name="paper",
    scale=5.0,
    margins={"cosface": 0.1, "arcface": 0.1},
    sample_margin_weight=0.0,
    zero_centroid_weight=5.0,
    zero_centroid_form="sum",
    schedule=Schedule(
        epochs=250,
        batch_size=256,
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-4,
        gradient_clip_norm=5.0,
    ),
    regularizer_weights={"sample_margin": 5.0, "zero_centroid": 5.0},
    description=(
        "The defaults of the authors' visual-classification training script for 'Learning "
        "Towards the Largest Margins' (Zhou et al., ICLR 2022), as read in copies of that "
        "script published in public repositories (two copies agree on every value below; the "
        "authors' own repository itself could not be located with the search tools, so treat "
        "the values as the script's defaults, not as the paper's per-experiment settings): "
        "scale s = 5 for the cosine losses (NormFace, CosFace, ArcFace, LM-Softmax); CosFace "
        "m = 0.1 and ArcFace m = 0.1 rad (5.73°); one regularizer weight λ = 5 for whichever "
        "regularizer is chosen, the zero-centroid one by default, in the sum form ‖Σ_j ŵ_j‖² "
        "(= 5·C² in this package's mean form; for R_sm pass --zero-centroid-weight 0 "
        "--sample-margin-weight 5); SGD lr 0.1, momentum 0.9, weight decay 1e-4 on the network "
        "and the prototypes, batch 256, 250 epochs, cosine annealing to 0 (stepped per epoch "
        "there, per iteration here); gradient norm of network and prototypes clipped at 5. "
        "Their network (a CIFAR ResNet-34) and augmentation are not part of the recipe. Fixed "
        "prototypes ('fix' mode, loaded from a generated .npy file) correspond to "
        "--fixed-prototypes."
    ),
)

RECIPES: dict[str, Recipe] = {recipe.name: recipe for recipe in (PACKAGE_RECIPE, PAPER_RECIPE)}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]
