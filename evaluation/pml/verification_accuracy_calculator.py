"""Face-verification pair metrics inside PML's ``AccuracyCalculator``.

PML's calculator hands every ``calculate_<metric>`` method the query embeddings and labels, so
pair metrics fit it without a tester hook: the pairs are formed from the query set, scored by
cosine similarity, and handed to the functional core (:mod:`evaluation.verification`) once per
``get_accuracy`` call, however many pair metrics are requested. Testers that call
``get_accuracy(query, query_labels)`` (PML's ``GlobalEmbeddingSpaceTester`` among them) then log
them like any other metric. The reference set plays no part in the pair metrics.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from .._deprecation import DeprecatedAlias, renamed_keywords
from ..defaults import DEFAULT_NUM_FOLDS
from ..knn import l2_normalize
from ..validation import ArrayLike
from ..verification import verification_accuracy_10fold, verification_report
from ..verification.pair_metrics import TAR_AT_FAR_RULES, check_far_targets
from ._pml import AccuracyCalculator

PAIR_MODES = ("interleaved", "all")
_REPORT_KEY = "verification_report"
_TEN_FOLD_KEY = "verification_ten_fold"


def tar_metric_name(far_target: float) -> str:
    """The metric name of TAR at one FAR, e.g. ``tar_at_far_0.001`` or ``tar_at_far_1e-06``."""
    return f"tar_at_far_{far_target:g}"


class VerificationAccuracyCalculator(AccuracyCalculator):
    """An ``AccuracyCalculator`` that also reports 1:1 verification metrics.

    Pairs (``pairs=``):
    - ``"interleaved"``: query rows 0::2 against rows 1::2, genuine when their labels are equal
      (the layout of ``.bin`` pair sets and :func:`evaluation.verification.load_bin`); adds
      ``verification_accuracy`` (mean of the ``num_folds``-fold protocol, docs/theory.md §6).
    - ``"all"``: every unordered pair of distinct query rows, n (n − 1) / 2 of them, so meant
      for validation sets of up to a few thousand embeddings.

    Metrics: ``verification_auc``, ``verification_eer`` and, per FAR target,
    ``tar_at_far_<target>`` (see :func:`tar_metric_name`) under ``tar_rule``; plus PML's own
    metrics unless ``include``/``exclude`` select otherwise.
    """

    n_folds = DeprecatedAlias("num_folds")

    @renamed_keywords(n_folds="num_folds")
    def __init__(
        self,
        *args,
        pairs: str = "interleaved",
        far_targets: ArrayLike | float = (1e-4, 1e-3, 1e-2),
        tar_rule: str = "nearest",
        num_folds: int = DEFAULT_NUM_FOLDS,
        **kwargs,
    ) -> None:
        if pairs not in PAIR_MODES:
            raise ValueError(f"pairs must be one of {PAIR_MODES}, got {pairs!r}")
        if tar_rule not in TAR_AT_FAR_RULES:
            raise ValueError(f"tar_rule must be one of {TAR_AT_FAR_RULES}, got {tar_rule!r}")
        self.pairs = pairs
        self.far_targets = check_far_targets(far_targets)
        self.tar_rule = tar_rule
        self.num_folds = num_folds
        # PML discovers metrics from the calculate_* attributes when it is initialised.
        self.pair_metric_names = ["verification_auc", "verification_eer"]
        for position, target in enumerate(self.far_targets):
            name = tar_metric_name(target)
            setattr(self, f"calculate_{name}", partial(self._tar_at_far, position=position))
            self.pair_metric_names.append(name)
        if pairs == "interleaved":
            self.calculate_verification_accuracy = self._ten_fold_accuracy
            self.pair_metric_names.append("verification_accuracy")
        super().__init__(*args, **kwargs)

    def calculate_verification_auc(self, **kwargs) -> float:
        return kwargs[_REPORT_KEY].auc

    def calculate_verification_eer(self, **kwargs) -> float:
        return kwargs[_REPORT_KEY].eer

    def _tar_at_far(self, position: int, **kwargs) -> float:
        report = kwargs[_REPORT_KEY]
        values = (
            report.tar_at_far_nearest if self.tar_rule == "nearest" else report.tar_at_far_threshold
        )
        return float(values[position])

    def _ten_fold_accuracy(self, **kwargs) -> float:
        return kwargs[_TEN_FOLD_KEY].accuracy_mean

    def _get_accuracy(self, function_dict, **kwargs):
        requested = set(function_dict) & set(self.pair_metric_names)
        if requested:
            embeddings = kwargs["query"].detach().float().cpu().numpy()
            labels = kwargs["query_labels"].detach().cpu().numpy()
            if labels.ndim != 1:
                raise ValueError("verification metrics need one label per query embedding")
            scores, issame = self._pair_scores(embeddings, labels)
            if requested - {"verification_accuracy"}:
                kwargs[_REPORT_KEY] = verification_report(scores, issame, self.far_targets)
            if "verification_accuracy" in requested:
                kwargs[_TEN_FOLD_KEY] = verification_accuracy_10fold(
                    embeddings, issame, num_folds=self.num_folds
                )
        return super()._get_accuracy(function_dict, **kwargs)

    def _pair_scores(self, embeddings: np.ndarray, labels: np.ndarray):
        unit = l2_normalize(embeddings)
        if self.pairs == "interleaved":
            if unit.shape[0] % 2:
                raise ValueError(
                    f"pairs='interleaved' needs an even number of query rows, got {unit.shape[0]}"
                )
            scores = np.einsum("ij,ij->i", unit[0::2], unit[1::2])
            return scores, labels[0::2] == labels[1::2]
        first, second = np.triu_indices(unit.shape[0], k=1)
        scores = (unit @ unit.T)[first, second]
        return scores, labels[first] == labels[second]
