"""Every name ``pml_largest_margin`` takes from pytorch-metric-learning, imported here only.

The package is tested against pytorch-metric-learning 2.x (``>=2.9,<3``); 3.0 removed or moved
trainers, testers and ``utils.loss_and_miner_utils``, so a port to 3.x starts in this module
(and in ``evaluation/pml/_pml.py``, the metrics library's counterpart). ``tests/test_layers.py``
checks that no other module imports pytorch-metric-learning.
"""

from __future__ import annotations

from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import trainers
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.losses.mixins import WeightRegularizerMixin
from pytorch_metric_learning.regularizers import BaseRegularizer
from pytorch_metric_learning.trainers import BaseTrainer, base_trainer
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from pytorch_metric_learning.utils.module_with_records_and_reducer import (
    ModuleWithRecordsAndReducer,
)

__all__ = [
    "BaseMetricLossFunction",
    "BaseRegularizer",
    "BaseTrainer",
    "CosineSimilarity",
    "ModuleWithRecordsAndReducer",
    "WeightRegularizerMixin",
    "base_trainer",
    "c_f",
    "lmu",
    "pml_losses",
    "trainers",
]
