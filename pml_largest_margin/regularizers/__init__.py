"""Margin regularizers for PML classification losses (docs/theory.md §4)."""

from .sample_margin_regularizer import SampleMarginRegularizer
from .sample_margin_regularizer_mixin import SampleMarginRegularizerMixin
from .with_sample_margin_regularizer import with_sample_margin_regularizer
from .zero_centroid_regularizer import ZeroCentroidRegularizer

__all__ = [
    "SampleMarginRegularizer",
    "SampleMarginRegularizerMixin",
    "ZeroCentroidRegularizer",
    "with_sample_margin_regularizer",
]
