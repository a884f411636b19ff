"""Zero-centroid regularization of the prototypes (docs/theory.md §4)."""

from __future__ import annotations

import math

import torch

from .._pml import BaseRegularizer
from ..margins import class_margin
from ..validation import check_choice, check_flag, check_prototypes

FORMS = ("mean", "sum")
DEFAULT_FORM = "mean"


class ZeroCentroidRegularizer(BaseRegularizer):
    """``R_w = ‖(1/C) Σ_j ŵ_j‖²``: pulls the centroid of the normalised prototypes to the origin.

    A PML weight regularizer: pass it as ``weight_regularizer=`` to any classification loss
    (``ArcFaceLoss``, ``CosFaceLoss``, ``NormalizedSoftmaxLoss``, ... and ours), which hands it
    ``W.t()`` of shape (num_classes, embedding_size) and multiplies it by ``weight_reg_weight``.

    ``form="mean"`` (default) is the quantity above, in [0, 1] whatever C is, so a given
    ``weight_reg_weight`` means the same at any number of classes. ``form="sum"`` is the authors'
    un-averaged ``‖Σ_j ŵ_j‖² = C²·R_w``; the same penalty takes a mean-form λ ``C²`` times the
    sum-form one. R_w is 0 exactly when the unit prototypes are centred (e.g. a regular simplex).

    With ``collect_stats`` it records ``centroid_norm`` (``‖(1/C) Σ_j ŵ_j‖``, either form) and,
    if ``record_class_margin``, ``class_margin_degrees``: that is :func:`class_margin`, O(C²d)
    per call (about 6 s at C = 100k, d = 128 and 14 min at C = 1M on 2 CPU cores), so turn it
    off, or collect stats only now and then, for many classes.
    """

    def __init__(self, form: str = DEFAULT_FORM, record_class_margin: bool = True, **kwargs):
        form = check_choice(form, "form", FORMS)
        record_class_margin = check_flag(record_class_margin, "record_class_margin")
        super().__init__(**kwargs)
        self.form = form
        self.record_class_margin = record_class_margin
        self.add_to_recordable_attributes(name="form", is_stat=False)
        self.add_to_recordable_attributes(name="centroid_norm", is_stat=True)
        if record_class_margin:
            self.add_to_recordable_attributes(name="class_margin_degrees", is_stat=True)

    def compute_loss(self, weights: torch.Tensor) -> dict:
        check_prototypes(weights.t(), "weights (W.t(), one row per class)")
        num_classes = weights.shape[0]
        if num_classes < 2:
            raise ValueError(
                f"the zero-centroid regularizer needs at least 2 classes, got {num_classes}"
            )
        if bool((torch.linalg.vector_norm(weights.detach(), dim=1) == 0).any()):
            raise ValueError("weights has a zero prototype row; its direction is undefined")
        centroid_sum = torch.nn.functional.normalize(weights, dim=1).sum(dim=0)
        squared_norm = centroid_sum.square().sum()
        if self.form == "mean":
            squared_norm = squared_norm / num_classes**2
        if self.collect_stats:
            with torch.no_grad():
                self.centroid_norm = float(torch.linalg.vector_norm(centroid_sum)) / num_classes
                if self.record_class_margin:
                    self.class_margin_degrees = math.degrees(class_margin(weights.t()).radians)
        return {
            "loss": {"losses": squared_norm, "indices": None, "reduction_type": "already_reduced"}
        }
