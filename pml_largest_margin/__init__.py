"""Largest-margin losses and regularizers for pytorch-metric-learning (Zhou et al., ICLR 2022)."""

__version__ = "0.1.0"
