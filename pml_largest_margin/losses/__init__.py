"""Largest-margin losses as native PML losses."""

from .generalized_margin_softmax_loss import GeneralizedMarginSoftmaxLoss
from .largest_margin_softmax_loss import LargestMarginSoftmaxLoss

__all__ = ["GeneralizedMarginSoftmaxLoss", "LargestMarginSoftmaxLoss"]
