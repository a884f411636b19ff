"""Maximally separated class prototypes, in PML's layout (embedding_size, num_classes).

``simplex_prototypes`` is the exact optimum for C ≤ d + 1; ``max_separated_prototypes`` finds
well-separated prototypes for any C numerically; ``freeze_prototypes`` makes a loss train against
fixed prototypes (docs/theory.md §4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .margins import class_margin, class_margin_upper_bound
from .validation import check_prototypes


@dataclass(frozen=True)
class SeparatedPrototypes:
    """Unit prototypes ``W`` (d, C), the class margin they reach and its upper bound (radians)."""

    prototypes: torch.Tensor
    radians: float
    upper_bound: float
    steps: int

    @property
    def degrees(self) -> float:
        return math.degrees(self.radians)

    @property
    def upper_bound_degrees(self) -> float:
        return math.degrees(self.upper_bound)


def _check_sizes(num_classes: int, embedding_size: int) -> None:
    for name, value in (("num_classes", num_classes), ("embedding_size", embedding_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if embedding_size < 1:
        raise ValueError(f"embedding_size must be at least 1, got {embedding_size}")


def simplex_prototypes(
    num_classes: int, embedding_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The vertices of a regular simplex centred at the origin, as unit columns of W (d, C).

    Needs ``C ≤ d + 1``. Every pair has cosine ``−1/(C−1)``, the largest class margin C
    prototypes can have. Built in float64 from the Helmert basis (rows orthonormal and
    orthogonal to the all-ones vector), so it is exact to rounding; the simplex occupies the
    first C − 1 coordinates.
    """
    _check_sizes(num_classes, embedding_size)
    if num_classes > embedding_size + 1:
        raise ValueError(
            f"a regular simplex of {num_classes} vertices needs embedding_size >= "
            f"{num_classes - 1}, got {embedding_size}; use max_separated_prototypes"
        )
    helmert = torch.zeros(num_classes - 1, num_classes, dtype=torch.float64)
    for k in range(1, num_classes):
        helmert[k - 1, :k] = 1.0 / math.sqrt(k * (k + 1))
        helmert[k - 1, k] = -k / math.sqrt(k * (k + 1))
    # Column j of the Helmert basis is the centred e_j in orthonormal coordinates, of norm
    # sqrt((C-1)/C).
    vertices = helmert * math.sqrt(num_classes / (num_classes - 1))
    prototypes = torch.zeros(embedding_size, num_classes, dtype=torch.float64)
    prototypes[: num_classes - 1] = vertices
    return prototypes.to(dtype)


def _default_restarts(num_classes: int) -> int:
    return max(1, min(16, 400 // num_classes))


def max_separated_prototypes(
    num_classes: int,
    embedding_size: int,
    steps: int = 2000,
    seed: int = 0,
    progress: bool = True,
    *,
    restarts: int | None = None,
    start_temperature: float = 0.05,
    end_temperature: float = 0.002,
    learning_rate: float = 0.01,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> SeparatedPrototypes:
    """Unit prototypes W (d, C) whose smallest pairwise angle is as large as we can make it.

    For ``C ≤ d + 1`` this is the regular simplex (optimal, no iterations). Otherwise it
    minimises a smooth maximum of the pairwise cosines, ``t·log Σ_{j≠k} exp(ŵ_j·ŵ_k / t)``,
    with the temperature t annealed geometrically from ``start_temperature`` to
    ``end_temperature`` over ``steps`` Adam steps of the Riemannian gradient, each followed by
    renormalisation onto the sphere. ``restarts`` independent random starts (default: up to 16
    for small C, one from C = 201) run as one batch and the best is kept; the iterate with the
    best margin seen is returned, so more steps never give a worse result. Seeded by ``seed``;
    ``progress`` shows a tqdm bar. Each step costs O(restarts·C²·d) time and O(restarts·C²)
    memory. The margin is measured with :func:`class_margin` on the returned tensor.
    """
    _check_sizes(num_classes, embedding_size)
    bound = class_margin_upper_bound(num_classes, embedding_size)
    if num_classes <= embedding_size + 1:
        prototypes = simplex_prototypes(num_classes, embedding_size, dtype).to(device)
        return SeparatedPrototypes(prototypes, class_margin(prototypes).radians, bound, 0)
    if embedding_size < 2:
        raise ValueError("more than 2 prototypes need embedding_size >= 2")
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    if not 0 < end_temperature <= start_temperature:
        raise ValueError(
            "need 0 < end_temperature <= start_temperature, got "
            f"{end_temperature} and {start_temperature}"
        )
    restarts = _default_restarts(num_classes) if restarts is None else restarts
    if restarts < 1:
        raise ValueError(f"restarts must be positive, got {restarts}")
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    points = torch.randn(restarts, num_classes, embedding_size, generator=generator)
    points = torch.nn.functional.normalize(points.to(device=device, dtype=dtype), dim=2)
    points.requires_grad_(True)
    optimizer = torch.optim.Adam([points], lr=learning_rate)
    diagonal = torch.eye(num_classes, dtype=torch.bool, device=points.device)
    best_cosine, best_points = math.inf, points.detach()[0].clone()

    def masked_cosines_keeping_best() -> torch.Tensor:
        # Pairwise cosines of every restart (self-pairs masked); remembers the best restart so far.
        nonlocal best_cosine, best_points
        cosines = points @ points.transpose(1, 2)
        cosines.masked_fill_(diagonal, -math.inf)
        worst, _ = cosines.flatten(1).max(dim=1)
        restart = int(torch.argmin(worst))
        if float(worst[restart]) < best_cosine:
            best_cosine = float(worst[restart])
            best_points = points[restart].clone()
        return cosines

    decay = math.log(end_temperature / start_temperature) / max(1, steps - 1)
    with tqdm(total=steps, desc="prototypes", disable=not progress) as bar:
        for step in range(steps):
            temperature = start_temperature * math.exp(decay * step)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate * (1.0 - step / steps)
            with torch.no_grad():
                cosines = masked_cosines_keeping_best()
                weights = torch.softmax(cosines.flatten(1) / temperature, dim=1).view_as(cosines)
                # d/dx_j of t·logsumexp over ordered pairs: 2 Σ_k p_jk x_k (p is symmetric);
                # the radial part is removed so the step is tangent to the sphere.
                gradient = 2.0 * weights @ points
                gradient -= (gradient * points).sum(dim=2, keepdim=True) * points
            points.grad = gradient
            optimizer.step()
            with torch.no_grad():
                points.copy_(torch.nn.functional.normalize(points, dim=2))
            if step % 50 == 0 or step == steps - 1:
                bar.set_postfix(degrees=f"{math.degrees(math.acos(min(1.0, best_cosine))):.3f}")
            bar.update(1)
    with torch.no_grad():
        masked_cosines_keeping_best()
    prototypes = torch.nn.functional.normalize(best_points.detach(), dim=1).t().contiguous()
    return SeparatedPrototypes(prototypes, class_margin(prototypes).radians, bound, steps)


def freeze_prototypes(
    loss: torch.nn.Module, prototypes: torch.Tensor | SeparatedPrototypes
) -> torch.nn.Module:
    """Write ``prototypes`` (d, C) into ``loss.W`` and freeze it; returns ``loss``.

    Works for any loss that keeps its prototypes in a ``W`` Parameter of PML's layout
    (PML's ``ArcFaceLoss``, ``CosFaceLoss``, ``NormalizedSoftmaxLoss``, ..., and ours).
    ``prototypes`` is a tensor or a :class:`SeparatedPrototypes`; columns are written
    normalised. ``W`` stops requiring gradients and its gradient is cleared, so optimisers
    (including ones built before, with weight decay) leave it as it is.
    """
    if isinstance(prototypes, SeparatedPrototypes):
        prototypes = prototypes.prototypes
    weights = getattr(loss, "W", None)
    if not isinstance(weights, torch.nn.Parameter):
        raise TypeError(f"{type(loss).__name__} has no prototype Parameter W to freeze")
    check_prototypes(prototypes, "prototypes")
    if prototypes.shape != weights.shape:
        raise ValueError(
            f"prototypes have shape {tuple(prototypes.shape)} but {type(loss).__name__}.W has "
            f"shape {tuple(weights.shape)}; both use PML's layout (embedding_size, num_classes)"
        )
    if bool((torch.linalg.vector_norm(prototypes, dim=0) == 0).any()):
        raise ValueError("prototypes has a zero column; its direction is undefined")
    with torch.no_grad():
        weights.copy_(torch.nn.functional.normalize(prototypes, dim=0))
    weights.requires_grad_(False)
    weights.grad = None
    return loss
