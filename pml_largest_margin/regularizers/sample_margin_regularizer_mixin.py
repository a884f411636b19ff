"""Attach :class:`SampleMarginRegularizer` to a classification loss as its own sub-loss."""

from __future__ import annotations

import torch

from .._pml import lmu
from ..validation import check_real
from .sample_margin_regularizer import SampleMarginRegularizer

#: Default weight λ of the sample-margin sub-loss λ·R_sm.
DEFAULT_SAMPLE_MARGIN_REG_WEIGHT = 1.0


class SampleMarginRegularizerMixin:
    """Adds ``λ·R_sm`` as the sub-loss ``sample_margin_loss`` of a loss that owns prototypes ``W``.

    Works like PML's ``WeightRegularizerMixin``: the class name ends in ``RegularizerMixin``, so
    ``sub_loss_names()`` lists ``sample_margin_loss`` whenever a regularizer is set and PML builds
    ``MultipleReducers`` for it; the value is ``sample_margin_regularizer(...) ·
    sample_margin_reg_weight`` (λ), passed on already reduced, like PML's weight regularization.

    A loss's ``compute_loss`` calls :meth:`add_sample_margin_regularization_to_loss_dict`,
    optionally with the class cosines or the sample margins it already computed (without
    either, the margins are computed from ``W``: one more N × d × C product). The margin follows the loss's own
    miner weights (``lmu.convert_to_weights`` of ``indices_tuple``) and its sub-centres
    (attribute ``sub_centers``, as in PML's ``SubCenterArcFaceLoss``).
    """

    def __init__(
        self,
        *args,
        sample_margin_regularizer: SampleMarginRegularizer | None = None,
        sample_margin_reg_weight: float = DEFAULT_SAMPLE_MARGIN_REG_WEIGHT,
        **kwargs,
    ):
        if sample_margin_regularizer is not None and not callable(sample_margin_regularizer):
            raise TypeError(
                "sample_margin_regularizer must be a SampleMarginRegularizer, "
                f"got {type(sample_margin_regularizer).__name__}"
            )
        sample_margin_reg_weight = check_real(
            sample_margin_reg_weight, "sample_margin_reg_weight", at_least=0
        )
        # Set before the base __init__, which asks sub_loss_names() while building the reducer;
        # a module cannot be assigned before torch.nn.Module.__init__ (PML does the same).
        self.sample_margin_regularizer = sample_margin_regularizer is not None
        super().__init__(*args, **kwargs)
        self.sample_margin_regularizer = sample_margin_regularizer
        self.sample_margin_reg_weight = sample_margin_reg_weight
        if sample_margin_regularizer is not None:
            self.add_to_recordable_attributes(
                list_of_names=["sample_margin_reg_weight"], is_stat=False
            )

    @property
    def samplemargin_regularizer(self) -> SampleMarginRegularizer | None:
        # PML finds a mixin's regularizer as "<class name without RegularizerMixin, lowercased>
        # _regularizer", here "samplemargin_regularizer".
        return self.sample_margin_regularizer

    def regularization_loss_names(self) -> list[str]:
        return ["sample_margin_loss"]

    def sample_margin_regularization_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: tuple | None = None,
        cosines: torch.Tensor | None = None,
        margins: torch.Tensor | None = None,
    ) -> dict:
        given = margins if margins is not None else cosines
        dtype = embeddings.dtype if given is None else given.dtype
        miner_weights = lmu.convert_to_weights(indices_tuple, labels, dtype=dtype)
        if given is None:
            value = self.sample_margin_regularizer(
                embeddings,
                labels,
                self.W,
                miner_weights=miner_weights,
                sub_centers=getattr(self, "sub_centers", 1),
            )
        else:
            value = self.sample_margin_regularizer(
                embeddings, labels, cosines=cosines, margins=margins, miner_weights=miner_weights
            )
        return {
            "losses": value * self.sample_margin_reg_weight,
            "indices": None,
            "reduction_type": "already_reduced",
        }

    def add_sample_margin_regularization_to_loss_dict(
        self,
        loss_dict: dict,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: tuple | None = None,
        cosines: torch.Tensor | None = None,
        margins: torch.Tensor | None = None,
    ) -> None:
        if self.sample_margin_regularizer is not None and "sample_margin_loss" not in loss_dict:
            loss_dict["sample_margin_loss"] = self.sample_margin_regularization_loss(
                embeddings, labels, indices_tuple, cosines, margins
            )
