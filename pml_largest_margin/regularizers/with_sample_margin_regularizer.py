"""Give any PML classification loss with prototypes ``W`` a sample-margin sub-loss."""

from __future__ import annotations

import functools

from .._pml import BaseMetricLossFunction, pml_losses
from .sample_margin_regularizer import SampleMarginRegularizer
from .sample_margin_regularizer_mixin import (
    DEFAULT_SAMPLE_MARGIN_REG_WEIGHT,
    SampleMarginRegularizerMixin,
)


@functools.cache
def with_sample_margin_regularizer(loss_class: type) -> type:
    """A subclass of ``loss_class`` that adds ``λ·R_sm`` as the sub-loss ``sample_margin_loss``.

    For PML's ``ArcFaceLoss``, ``CosFaceLoss``, ``NormalizedSoftmaxLoss``, ``SphereFaceLoss``,
    ``SubCenterArcFaceLoss`` (class cosine = best sub-centre) or any loss holding ``W`` (d, C).
    The new class takes the base's arguments plus ``sample_margin_regularizer`` (default a new
    :class:`SampleMarginRegularizer`) and ``sample_margin_reg_weight`` (λ, default 1). R_sm is
    computed from the cosines of the embeddings with ``W`` after the base loss, which costs one
    more N × d × C matrix product. Our losses take the regularizer natively (and are refused
    here): they pass the sample margins computed from the cosines they already hold. The same
    class is returned for the same ``loss_class``.

    Example: ``SampleMarginArcFaceLoss = with_sample_margin_regularizer(ArcFaceLoss)``.
    """
    if not (isinstance(loss_class, type) and issubclass(loss_class, BaseMetricLossFunction)):
        raise TypeError(f"loss_class must be a PML loss class, got {loss_class!r}")
    if issubclass(loss_class, SampleMarginRegularizerMixin):
        raise TypeError(
            f"{loss_class.__name__} already supports the sample-margin regularizer: "
            "pass sample_margin_regularizer=SampleMarginRegularizer() to it"
        )

    class SampleMarginLoss(SampleMarginRegularizerMixin, loss_class):
        def __init__(
            self,
            *args,
            sample_margin_regularizer: SampleMarginRegularizer | None = None,
            sample_margin_reg_weight: float = DEFAULT_SAMPLE_MARGIN_REG_WEIGHT,
            **kwargs,
        ):
            if sample_margin_regularizer is None:
                sample_margin_regularizer = SampleMarginRegularizer()
            super().__init__(
                *args,
                sample_margin_regularizer=sample_margin_regularizer,
                sample_margin_reg_weight=sample_margin_reg_weight,
                **kwargs,
            )
            if not hasattr(self, "W"):
                raise TypeError(f"{loss_class.__name__} has no prototypes W")

        def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels) -> dict:
            loss_dict = super().compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
            self.add_sample_margin_regularization_to_loss_dict(
                loss_dict, embeddings, labels, indices_tuple
            )
            return loss_dict

    name = f"SampleMargin{loss_class.__name__}"
    SampleMarginLoss.__name__ = SampleMarginLoss.__qualname__ = name
    return SampleMarginLoss


def __getattr__(name: str) -> type:
    # Lets pickle find a generated class of one of PML's losses by its name, e.g.
    # "SampleMarginArcFaceLoss", in a process that has not called the factory yet.
    prefix = "SampleMargin"
    if name.startswith(prefix):
        base = getattr(pml_losses, name[len(prefix) :], None)
        if isinstance(base, type) and issubclass(base, BaseMetricLossFunction):
            return with_sample_margin_regularizer(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
