from __future__ import annotations

import torch
import torch.distributed as dist

from .._pml import BaseRegularizer
from ..regularizers.zero_centroid_regularizer import DEFAULT_FORM, FORMS
from ..validation import check_choice
from ._collectives import replicated_all_reduce_sum, world_size


class ClassParallelZeroCentroidRegularizer(BaseRegularizer):
    """Zero-centroid regularization ``R_w = ‖(1/C) Σ_j ŵ_j‖²`` over prototypes split across ranks.

    Give it to a class-parallel loss as ``weight_regularizer``: it receives this rank's
    ``W.t()`` (C_local, d), sums its unit rows, and all-reduces the sum and the class count, so
    every rank gets the value of the single-process ``ZeroCentroidRegularizer(form=form)`` on the
    full W, and its W slice the exact slice of the gradient. ``form="mean"`` (default) is
    ``R_w``; ``form="sum"`` the authors' un-averaged ``‖Σ_j ŵ_j‖² = C² · R_w``.

    Like the single-process regularizer it raises ``ValueError`` on a zero prototype (its
    direction is undefined), on NaN/Inf, and on fewer than 2 classes in all; the ranks first
    exchange what they found, so a bad slice on one rank raises on every rank instead of
    leaving the others waiting in a collective; so does a ``form`` that differs across ranks.
    With ``collect_stats`` it records
    ``centroid_norm`` (``‖(1/C) Σ_j ŵ_j‖``). It does not record the class margin: that needs
    every pair of prototypes, i.e. the whole W on one rank.
    """

    def __init__(
        self, process_group: dist.ProcessGroup | None = None, form: str = DEFAULT_FORM, **kwargs
    ) -> None:
        form = check_choice(form, "form", FORMS)
        super().__init__(**kwargs)
        self.process_group = process_group
        self.form = form
        self.add_to_recordable_attributes(name="form", is_stat=False)
        self.add_to_recordable_attributes(name="centroid_norm", is_stat=True)

    def compute_loss(self, weights: torch.Tensor) -> dict:
        norms, num_classes = self._check_across_ranks(weights)
        # Σ_j w_j/‖w_j‖ as one product: no normalised copy of W.
        centroid_sum = replicated_all_reduce_sum(
            weights.t() @ norms.reciprocal(), self.process_group
        )
        loss = centroid_sum.square().sum()
        if self.form == "mean":
            loss = loss / num_classes**2
        if self.collect_stats:
            with torch.no_grad():
                self.centroid_norm = float(torch.linalg.vector_norm(centroid_sum)) / num_classes
        return {"loss": {"losses": loss, "indices": None, "reduction_type": "already_reduced"}}

    def _check_across_ranks(self, weights) -> tuple[torch.Tensor, int]:
        """This slice's row norms and the number of classes over all ranks, once every rank
        has checked its slice and they all agree."""
        norms, problem = None, ""
        if not isinstance(weights, torch.Tensor):
            problem = f"weights must be a torch.Tensor, got {type(weights).__name__}"
        elif weights.ndim != 2 or not weights.is_floating_point():
            problem = (
                f"weights must be a 2-D floating-point (C_local, d) matrix, got {weights.dtype} "
                f"of shape {tuple(weights.shape)}"
            )
        else:
            norms = torch.linalg.vector_norm(weights, dim=1)
            if not bool(torch.isfinite(norms).all()):
                problem = "weights contains NaN or Inf"
            elif bool((norms.detach() == 0).any()):
                problem = "weights has a zero prototype row; its direction is undefined"
        device = weights.device if isinstance(weights, torch.Tensor) else None
        dimension = weights.shape[1] if norms is not None else -1
        mine = [
            weights.shape[0] if norms is not None else 0,
            dimension,
            int(bool(problem)),
            FORMS.index(self.form),
        ]
        mine = torch.tensor(mine, dtype=torch.int64, device=device)
        table = [torch.empty_like(mine) for _ in range(world_size(self.process_group))]
        dist.all_gather(table, mine, group=self.process_group)
        rows, dimensions, bad, forms = torch.stack(table).cpu().t().tolist()
        if len(set(forms)) > 1:
            raise ValueError(
                f"form differs across ranks: {[FORMS[form] for form in forms]}; every rank "
                "must build the same regularizer"
            )
        if problem:
            raise ValueError(problem)
        if any(bad):
            bad_ranks = [index for index, flag in enumerate(bad) if flag]
            raise ValueError(f"invalid prototypes on rank(s) {bad_ranks}; see their errors")
        if len(set(dimensions)) > 1:
            raise ValueError(f"prototype dimensions differ across ranks: {dimensions}")
        num_classes = sum(rows)
        if num_classes < 2:
            raise ValueError(
                f"the zero-centroid regularizer needs at least 2 classes, got {num_classes}"
            )
        return norms, num_classes
