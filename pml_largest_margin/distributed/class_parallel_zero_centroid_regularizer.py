from __future__ import annotations

import torch
import torch.distributed as dist
from pytorch_metric_learning.regularizers import BaseRegularizer

from ._collectives import replicated_all_reduce_sum

_NORM_EPS = 1e-12
_FORMS = ("mean", "sum")


class ClassParallelZeroCentroidRegularizer(BaseRegularizer):
    """Zero-centroid regularization ``R_w = ‖(1/C) Σ_j ŵ_j‖²`` over prototypes split across ranks.

    Give it to a class-parallel loss as ``weight_regularizer``: it receives this rank's
    ``W.t()`` (C_local, d), sums its unit rows, and all-reduces the sum and the class count, so
    every rank gets the value for the full W and its W slice the exact slice of the gradient.
    ``form="mean"`` (default) is ``R_w``; ``form="sum"`` the authors' un-averaged
    ``‖Σ_j ŵ_j‖² = C² · R_w`` (the ``form`` argument of the single-process regularizer).
    """

    def __init__(self, process_group=None, form: str = "mean", **kwargs):
        super().__init__(**kwargs)
        if form not in _FORMS:
            raise ValueError(f"form must be one of {_FORMS}, got {form!r}")
        self.process_group = process_group
        self.form = form
        self.add_to_recordable_attributes(list_of_names=["form"], is_stat=False)

    def compute_loss(self, weights):
        if weights.ndim != 2 or not weights.is_floating_point():
            raise ValueError(
                f"weights must be a 2-D floating-point (C_local, d) matrix, got {weights.dtype} "
                f"of shape {tuple(weights.shape)}"
            )
        inverse_norms = torch.linalg.vector_norm(weights, dim=1).clamp_min(_NORM_EPS).reciprocal()
        # Σ_j w_j/‖w_j‖ as one product: no normalised copy of W.
        centroid = replicated_all_reduce_sum(weights.t() @ inverse_norms, self.process_group)
        if self.form == "mean":
            count = torch.tensor(float(weights.shape[0]), device=weights.device)
            dist.all_reduce(count, group=self.process_group)
            centroid = centroid / count
        loss = centroid.square().sum()
        return {"loss": {"losses": loss, "indices": None, "reduction_type": "already_reduced"}}
