"""Functional core of the margin-softmax losses: per-sample losses from cosines (docs/theory.md §3).

Both losses split into a large part over all classes and a small head per sample. The large part
is ``u_i = log Σ_{j≠y_i} exp(s·φ(cos_ij))``, the log-sum-exp over the non-target classes; the head
combines it with the target cosine ``t_i = cos_{i,y_i}``:

- LM-Softmax: ``L_i = (1/s)·log Σ_{j≠y} exp(s·(cos_ij − t_i)) = u_i/s − t_i``;
- GM-Softmax: ``L_i = −log(e^{s·ψ(t_i)} / (e^{s·ψ(t_i)} + e^{u_i})) = log(1 + e^{u_i − s·ψ(t_i)})``.

The functions here take an (N, C) cosine matrix and go through autograd: they are the reference
path, and the path for a non-default ``φ``. :mod:`pml_largest_margin.losses.fused` computes
``(u, t)`` straight from embeddings and prototypes with a hand-written gradient; the heads below are
shared by both paths (and by class-parallel versions, which combine ``u`` across shards).
"""

from __future__ import annotations

import math

import torch

from .margin_functions import MarginFunction


def target_cosines(cosines: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``t_i = cos_{i,y_i}``, shape (N,)."""
    return cosines.gather(1, labels.long()[:, None]).squeeze(1)


def nontarget_logsumexp(cosines: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """``u_i = log Σ_{j≠y_i} exp(s·cos_ij)``: a masked log-sum-exp (target set to −inf first)."""
    logits = (scale * cosines).scatter(1, labels.long()[:, None], -math.inf)
    return torch.logsumexp(logits, dim=1)


def largest_margin_softmax_head(
    nontarget_lse: torch.Tensor, target: torch.Tensor, scale: float
) -> torch.Tensor:
    """LM-Softmax per sample from ``u`` and ``t``: ``u/s − t``."""
    return nontarget_lse / scale - target


def generalized_margin_softmax_head(
    nontarget_lse: torch.Tensor, target_logit: torch.Tensor, scale: float
) -> torch.Tensor:
    """GM-Softmax per sample from ``u`` and ``ψ(t)``: ``log(1 + exp(u − s·ψ(t)))``, computed stably."""
    difference = nontarget_lse - scale * target_logit
    return torch.logaddexp(torch.zeros_like(difference), difference)


def largest_margin_softmax(
    cosines: torch.Tensor, labels: torch.Tensor, scale: float
) -> torch.Tensor:
    """Per-sample LM-Softmax losses ``(1/s)·log Σ_{j≠y} exp(s·(cos_ij − cos_iy))``, shape (N,)."""
    return largest_margin_softmax_head(
        nontarget_logsumexp(cosines, labels, scale), target_cosines(cosines, labels), scale
    )


def generalized_margin_softmax(
    cosines: torch.Tensor,
    labels: torch.Tensor,
    scale: float,
    psi: MarginFunction,
    phi: MarginFunction | None = None,
) -> torch.Tensor:
    """Per-sample GM-Softmax losses with target function ``psi`` and non-target ``phi``, shape (N,).

    ``phi=None`` means ``φ(θ) = cos θ``.
    """
    others = cosines if phi is None else phi(cosines)
    return generalized_margin_softmax_head(
        nontarget_logsumexp(others, labels, scale), psi(target_cosines(cosines, labels)), scale
    )
