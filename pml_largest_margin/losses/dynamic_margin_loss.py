"""ArcFace with per-class margins from the class frequencies, for long-tailed data."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._angles import additive_angular_margin
from .base_margin_head_loss import BaseMarginHeadLoss
from .base_margin_softmax_loss import DEFAULT_SCALE


class DynamicMarginLoss(BaseMarginHeadLoss):
    """Dynamic-margin ArcFace (docs/theory.md §7.5): rarer classes get larger margins.

    From the training-set count ``n_y`` of every class (given at construction),

        m_y = a·n_y^(−λ) + b,   ψ_i(θ) = cos(θ + m_{y_i}),

    with ArcFace's continuation ``cos θ − m·sin m`` beyond ``θ > π − m_{y_i}`` and plain cosines
    for the other classes. Defaults ``a = 0.5``, ``λ = 0.25``, ``b = 0.05``, ``s = 64``, after the
    dynamic margins of the Google Landmark Recognition 2020 winning solution (Ha et al., 2020),
    whose code also min-max normalises ``n^(−1/4)`` over the classes before scaling by ``a``; here
    the formula is used as written above. The margins are the buffer ``class_margins`` (C,).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        class_counts: Sequence[int] | torch.Tensor,
        a: float = 0.5,
        power: float = 0.25,
        b: float = 0.05,
        scale: float = DEFAULT_SCALE,
        **kwargs,
    ):
        super().__init__(num_classes, embedding_size, scale, **kwargs)
        counts = torch.as_tensor(class_counts, dtype=torch.float64)
        if counts.shape != (self.num_classes,):
            raise ValueError(
                f"class_counts must hold one count per class ({self.num_classes}), "
                f"got shape {tuple(counts.shape)}"
            )
        if not bool(torch.isfinite(counts).all()) or bool((counts <= 0).any()):
            raise ValueError("class_counts must be finite and > 0")
        if not all(math.isfinite(value) for value in (a, power, b)):
            raise ValueError(f"a, power and b must be finite, got {a}, {power}, {b}")
        margins = a * counts.pow(-power) + b
        if bool((margins < 0).any()) or bool((margins >= math.pi).any()):
            raise ValueError(
                f"the class margins a·n^(−λ) + b must lie in [0, π), got values in "
                f"[{float(margins.min())}, {float(margins.max())}]"
            )
        self.a, self.power, self.b = float(a), float(power), float(b)
        self.register_buffer("class_margins", margins)
        self.add_to_recordable_attributes(list_of_names=["a", "power", "b"], is_stat=False)

    def target_logits(
        self, target_cosines: torch.Tensor, norms: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        margins = self.class_margins.to(target_cosines)[labels.long()]
        return additive_angular_margin(target_cosines, margins)
