"""Helpers shared by the loss tests: per-sample losses and straightforward reference formulas."""

from __future__ import annotations

import math

import torch
from pytorch_metric_learning.reducers import DoNothingReducer


def seeded_randn(*shape: int) -> torch.Tensor:
    """Normal random numbers for inputs built at collection time (parametrize lists), seeded."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


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


FLOAT32_EPS = torch.finfo(torch.float32).eps


def float32_tolerances(function, inputs, *, trials: int = 8, safety: float = 4.0) -> list[float]:
    """How far a float32 evaluation of ``function(*inputs)`` may be from its float64 value.

    To first order, a float32 evaluation of these losses is the exact function of inputs perturbed
    relatively by at most about ``(d + 4)·eps32`` per entry: the rounding of the inputs, of the
    d-term dot products and of the normalisations (d = the inputs' last dimension), the log-sum-exp
    and the heads adding a few eps on logits of size s. So the tolerance follows the conditioning:
    the largest move of each output (∞-norm, in float64) under ``trials`` random perturbations of
    that size, times ``safety``, plus the rounding of the output itself, ``2·eps32·max|output|``.
    ``inputs`` are float64 tensors; ``function`` returns a tuple of tensors. Seeded, deterministic.
    """
    generator = torch.Generator().manual_seed(1234)
    relative = (inputs[0].shape[-1] + 4) * FLOAT32_EPS
    reference = function(*inputs)
    largest = [0.0] * len(reference)
    for _ in range(trials):
        perturbed = [
            x * (1 + relative * (2 * torch.rand(x.shape, generator=generator, dtype=x.dtype) - 1))
            for x in inputs
        ]
        for index, (moved, value) in enumerate(zip(function(*perturbed), reference, strict=True)):
            largest[index] = max(largest[index], float((moved - value).abs().max()))
    return [
        safety * move + 2 * FLOAT32_EPS * float(value.abs().max())
        for move, value in zip(largest, reference, strict=True)
    ]
