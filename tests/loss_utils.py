"""Helpers shared by the loss tests: per-sample losses and straightforward reference formulas."""

from __future__ import annotations

import math

import torch
from pytorch_metric_learning.reducers import DoNothingReducer


def unreduced_losses(loss_fn, embeddings, labels) -> torch.Tensor:
    """The loss's per-sample losses, read through PML's DoNothingReducer."""
    reducer = loss_fn.reducer
    loss_fn.reducer = DoNothingReducer()
    try:
        return loss_fn(embeddings, labels)["loss"]["losses"]
    finally:
        loss_fn.reducer = reducer


def reference_cosines(embeddings, W) -> torch.Tensor:
    """cos_ij written out: normalise both sides (norms clamped to 1e-12, the package's rule for
    zero vectors), then dot products."""
    unit_embeddings = embeddings / embeddings.norm(dim=1, keepdim=True).clamp_min(1e-12)
    unit_prototypes = W / W.norm(dim=0, keepdim=True).clamp_min(1e-12)
    return unit_embeddings @ unit_prototypes


def reference_lm_softmax(embeddings, W, labels, scale) -> list[float]:
    """(1/s) log Σ_{j≠y} exp(s (cos_ij − cos_iy)), one sample at a time in float64."""
    cosines = reference_cosines(embeddings.double(), W.double())
    losses = []
    for row, label in zip(cosines.tolist(), labels.tolist(), strict=True):
        terms = [math.exp(scale * (c - row[label])) for j, c in enumerate(row) if j != label]
        losses.append(math.log(sum(terms)) / scale)
    return losses


def reference_gm_softmax(embeddings, W, labels, scale, psi_of_angle) -> list[float]:
    """−log(e^{sψ(θ_y)} / (e^{sψ(θ_y)} + Σ_{j≠y} e^{s cos θ_j})), one sample at a time."""
    cosines = reference_cosines(embeddings.double(), W.double())
    losses = []
    for row, label in zip(cosines.tolist(), labels.tolist(), strict=True):
        target = scale * psi_of_angle(math.acos(max(-1.0, min(1.0, row[label]))))
        others = [scale * c for j, c in enumerate(row) if j != label]
        top = max([target, *others])
        denominator = sum(math.exp(v - top) for v in [target, *others])
        losses.append(-(target - top - math.log(denominator)))
    return losses
