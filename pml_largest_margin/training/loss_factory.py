"""Classification losses by name, with the paper's regularizers attached: one place for demo and train."""

from __future__ import annotations

from collections.abc import Sequence

from pml_largest_margin.losses import (
    AdaCosLoss,
    AdaFaceLoss,
    CurricularFaceLoss,
    DynamicMarginLoss,
    ElasticFaceLoss,
    GeneralizedMarginSoftmaxLoss,
    LargestMarginSoftmaxLoss,
    MagFaceLoss,
)
from pml_largest_margin.losses.base_margin_softmax_loss import BaseMarginSoftmaxLoss
from pml_largest_margin.regularizers import (
    SampleMarginRegularizer,
    SampleMarginRegularizerMixin,
    ZeroCentroidRegularizer,
    with_sample_margin_regularizer,
)

from .._pml import BaseMetricLossFunction, pml_losses
from .loss_registry import LOSS_NAMES, LOSSES, check_loss_options, check_sub_centers, loss_spec
from .recipes import PACKAGE_RECIPE
from .softmax_cross_entropy_loss import SoftmaxCrossEntropyLoss

__all__ = ["DEFAULT_MARGINS", "DEFAULT_SCALE", "LOSS_NAMES", "build_loss"]

# The scale of the losses that have one, when neither the caller nor the loss's entry sets it:
# the package recipe's (pml-lm train's default).
DEFAULT_SCALE = PACKAGE_RECIPE.scale
# Margins where a loss has one, in the units of ``loss_registry`` (every angle in radians).
DEFAULT_MARGINS = {spec.name: spec.margin.default for spec in LOSSES if spec.margin is not None}
# The margin heads (docs/losses.md, "Margin heads"): class and fixed options. AdaCos sets its own
# scale; the dynamic margins need the training set's class counts.
_HEADS = {
    "adaface": (AdaFaceLoss, {}),
    "magface": (MagFaceLoss, {}),
    "curricularface": (CurricularFaceLoss, {}),
    "elasticface-arc": (ElasticFaceLoss, {"variant": "arc"}),
    "elasticface-cos": (ElasticFaceLoss, {"variant": "cos"}),
    "adacos": (AdaCosLoss, {"dynamic": True}),
    "adacos-fixed": (AdaCosLoss, {"dynamic": False}),
    "dynamic-margin": (DynamicMarginLoss, {}),
}


def _loss_class_and_options(name: str, scale: float, margin: float | None) -> tuple[type, dict]:
    if name == "softmax":
        return SoftmaxCrossEntropyLoss, {}
    if name == "normface":
        return pml_losses.NormalizedSoftmaxLoss, {"temperature": 1.0 / scale}
    if name == "cosface":
        return pml_losses.CosFaceLoss, {"margin": margin, "scale": scale}
    if name == "arcface":
        # GM-Softmax's m2, in radians: PML's ArcFaceLoss's formula (tested equal), on the fused
        # kernel, with sub-centres on request.
        return GeneralizedMarginSoftmaxLoss, {"m2": margin, "scale": scale}
    if name in _HEADS:
        loss_class, options = _HEADS[name]
        options = dict(options) if loss_class is AdaCosLoss else {**options, "scale": scale}
        return loss_class, options if margin is None else {**options, "margin": margin}
    if name == "sphereface":
        # PML's SphereFace multiplies the logits by s·‖x‖; its own default s is 1.
        return pml_losses.SphereFaceLoss, {"margin": int(margin), "scale": scale}
    return LargestMarginSoftmaxLoss, {"scale": scale}


def build_loss(
    name: str,
    num_classes: int,
    embedding_size: int,
    *,
    scale: float | None = None,
    margin: float | None = None,
    sample_margin_weight: float = 0.0,
    zero_centroid_weight: float = 0.0,
    class_counts: Sequence[int] | None = None,
    zero_centroid_form: str = "mean",
    record_margins: bool = False,
    sub_centers: int = 1,
) -> BaseMetricLossFunction:
    """The loss ``name`` (one of ``LOSS_NAMES``) owning prototypes ``W`` of shape (d, C).

    ``scale`` is ``s`` of the losses that have one (``loss_registry``; ignored by the others);
    None takes the loss's entry's default, else ``DEFAULT_SCALE``. ``margin`` is in the unit of
    the loss's entry (radians for every angular margin, ArcFace's included); None takes its
    default.

    ``sample_margin_weight`` λ > 0 adds ``λ · R_sm`` as the sub-loss ``sample_margin_loss``;
    ``zero_centroid_weight`` λ > 0 adds ``λ · ‖mean_j ŵ_j‖²`` (the mean form; ``"sum"``:
    ``λ · ‖Σ_j ŵ_j‖²``, the authors') as PML's ``weight_reg_loss``. ``record_margins`` makes
    this package's losses (LM-Softmax, GM-Softmax's ArcFace and the margin heads) record what
    a :class:`~pml_largest_margin.margin_monitor.MarginMonitor` reads
    (``record_target_cosines``: detached tensors per batch, no PML stats); PML's losses and the
    plain softmax record nothing and are monitored from their inputs. ``class_counts`` (the
    training set's count of each class) is needed by ``dynamic-margin`` and ignored by the other
    losses. ``sub_centers`` k > 1 gives ``lm-softmax`` and ``arcface`` k prototypes per class (W
    of shape (d, C·k)); refused for the others.
    """
    spec = loss_spec(name)
    if scale is None:
        scale = DEFAULT_SCALE if spec.default_scale is None else spec.default_scale
    # A scale passed to a loss without one is ignored here (the demo passes one scale to every
    # row); the command line refuses it through check_loss_options.
    check_loss_options(name, scale if spec.takes_scale else None, margin)
    check_sub_centers(name, sub_centers)
    if not (sample_margin_weight >= 0 and zero_centroid_weight >= 0):  # NaN fails too
        raise ValueError(
            "regularizer weights must be non-negative numbers, got "
            f"{sample_margin_weight}, {zero_centroid_weight}"
        )
    loss_class, options = _loss_class_and_options(
        name, scale, DEFAULT_MARGINS.get(name) if margin is None else margin
    )
    if name == "dynamic-margin":
        if class_counts is None:
            raise ValueError("loss 'dynamic-margin' needs the training set's class_counts")
        options["class_counts"] = class_counts
    if sub_centers > 1:
        options["sub_centers"] = sub_centers
    if record_margins and issubclass(loss_class, BaseMarginSoftmaxLoss):
        options.update(record_target_cosines=True)
    if zero_centroid_weight > 0:
        options.update(
            weight_regularizer=ZeroCentroidRegularizer(
                form=zero_centroid_form, record_class_margin=False
            ),
            weight_reg_weight=zero_centroid_weight,
        )
    if sample_margin_weight > 0:
        if not issubclass(loss_class, SampleMarginRegularizerMixin):
            loss_class = with_sample_margin_regularizer(loss_class)
        options.update(
            sample_margin_regularizer=SampleMarginRegularizer(),
            sample_margin_reg_weight=sample_margin_weight,
        )
    return loss_class(num_classes, embedding_size, **options)
