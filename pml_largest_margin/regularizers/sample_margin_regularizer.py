"""Sample-margin regularization ``R_sm = −mean_i γ_i`` (docs/theory.md §4)."""

from __future__ import annotations

import torch

from .._pml import ModuleWithRecordsAndReducer, c_f
from ..margins import sample_margins, sample_margins_from_cosines
from ..validation import check_embeddings, check_labels


class SampleMarginRegularizer(ModuleWithRecordsAndReducer):
    """``R_sm = mean_i(max_{j≠y_i} cos_ij − cos_{i,y_i}) = −mean_i γ_i``.

    It needs embeddings, labels and prototypes together, which PML's ``weight_regularizer`` and
    ``embedding_regularizer`` slots do not pass: attach it to a loss through
    :class:`SampleMarginRegularizerMixin` (our losses) or :func:`with_sample_margin_regularizer`
    (PML's losses). Called on its own, it returns the reduced value: each sample contributes the
    element loss ``−γ_i`` (times its miner weight, if given) and the ``reducer`` (default
    ``MeanReducer``) reduces them.

    With ``collect_stats`` it records ``mean_sample_margin`` and ``min_sample_margin`` (cosine
    units, over the whole batch, before miner weights); each call resets them first, so after an
    empty batch they are PML's reset value 0, not the previous batch's. An empty batch gives
    ``R_sm = 0`` on the graph.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_to_recordable_attributes(
            list_of_names=["mean_sample_margin", "min_sample_margin"], is_stat=True
        )

    def compute_loss(
        self, margins: torch.Tensor, miner_weights: torch.Tensor | None = None
    ) -> dict:
        if self.collect_stats and margins.numel():
            with torch.no_grad():
                self.mean_sample_margin = margins.mean().item()
                self.min_sample_margin = margins.min().item()
        losses = -margins if miner_weights is None else -margins * miner_weights
        if not margins.numel():
            # No samples: a zero on the graph (a reducer's mean of nothing would be NaN).
            return {
                "loss": {
                    "losses": losses.sum(),
                    "indices": None,
                    "reduction_type": "already_reduced",
                }
            }
        return {
            "loss": {
                "losses": losses,
                "indices": c_f.torch_arange_from_size(margins),
                "reduction_type": "element",
            }
        }

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        W: torch.Tensor | None = None,
        *,
        cosines: torch.Tensor | None = None,
        margins: torch.Tensor | None = None,
        miner_weights: torch.Tensor | None = None,
        sub_centers: int = 1,
    ) -> torch.Tensor:
        """R_sm of a batch, from the prototypes ``W`` (d, C), class ``cosines`` (N, C) or ``margins``.

        Give exactly one of ``W``, ``cosines`` and ``margins``. ``cosines`` lets a loss that
        already holds the class cosines skip the second matrix product; ``margins`` (N,) are the
        sample margins ``γ_i`` a loss computed itself (differentiable, in cosine units, e.g. the
        fused kernel's), used as given. ``sub_centers=k`` reads ``W`` as
        (d, C·k) with class-major columns, each class's cosine being its best sub-centre.
        ``miner_weights`` (N,) scale each sample's term, as PML's classification losses scale
        theirs.
        """
        self.reset_stats()
        if sum(source is not None for source in (W, cosines, margins)) != 1:
            raise ValueError("give exactly one of W (d, C), cosines (N, C) and margins (N,)")
        check_embeddings(embeddings, finite=False)
        if margins is not None:
            check_labels(labels, None, embeddings.shape[0])
            if not (isinstance(margins, torch.Tensor) and margins.is_floating_point()):
                raise TypeError(f"margins must be a floating-point tensor, got {margins!r}")
            if margins.shape != (embeddings.shape[0],):
                raise ValueError(
                    f"margins must have shape ({embeddings.shape[0]},), one per embedding, "
                    f"got {tuple(margins.shape)}"
                )
        elif W is not None:
            margins = sample_margins(embeddings, labels, W, sub_centers=sub_centers)
        else:
            check_embeddings(cosines, "cosines")
            if cosines.shape[0] != embeddings.shape[0]:
                raise ValueError(
                    f"cosines has {cosines.shape[0]} rows but there are "
                    f"{embeddings.shape[0]} embeddings"
                )
            if cosines.shape[1] < 2:
                raise ValueError(f"sample margins need at least 2 classes, got {cosines.shape[1]}")
            check_labels(labels, cosines.shape[1], cosines.shape[0])
            margins = sample_margins_from_cosines(cosines, labels)
        if miner_weights is not None and miner_weights.shape != margins.shape:
            raise ValueError(
                f"miner_weights must have shape {tuple(margins.shape)}, "
                f"got {tuple(miner_weights.shape)}"
            )
        loss_dict = self.compute_loss(margins, miner_weights)
        return self.reducer(loss_dict, embeddings, labels)
