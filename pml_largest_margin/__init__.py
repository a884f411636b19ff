"""Largest-margin losses and regularizers for pytorch-metric-learning (Zhou et al., ICLR 2022)."""

from ._shadowing import warn_if_evaluation_shadowed

__version__ = "0.1.0"

warn_if_evaluation_shadowed()
