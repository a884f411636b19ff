"""Every name ``evaluation`` takes from pytorch-metric-learning, imported here only.

Only the adapters of :mod:`evaluation.pml` use pytorch-metric-learning; the metrics themselves
do not. Tested against 2.x (``>=2.9,<3``): 3.0 moved the testers and
``utils.accuracy_calculator``, so a port to 3.x starts here (and in ``pml_largest_margin/_pml.py``).
``tests/test_layers.py`` checks that no other module imports pytorch-metric-learning.
"""

from __future__ import annotations

from pytorch_metric_learning.testers import GlobalEmbeddingSpaceTester
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

__all__ = ["AccuracyCalculator", "GlobalEmbeddingSpaceTester"]
