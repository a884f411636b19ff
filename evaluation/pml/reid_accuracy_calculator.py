"""PML AccuracyCalculator with the camera-aware re-ID metrics: CMC rank-k, mAP and mINP."""

from __future__ import annotations

from functools import partial

import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from ..reid import ReIDResult, evaluate_reid


class ReIDAccuracyCalculator(AccuracyCalculator):
    """Re-ID metrics of docs/theory.md §5 (``evaluation.reid.evaluate_reid``) inside PML.

    Labels carry both ids: ``query_labels`` and ``reference_labels`` are (n, 2) rows of
    ``(pid, camid)``. Metrics: ``cmc_rank_<k>`` for each k in ``ranks``, ``reid_mAP`` and
    ``reid_mINP``. When the reference includes the query (PML's ``ref_includes_query``), each
    query finds itself with its own pid and camid, which the protocol already drops as junk.
    The metrics rank every reference item, so PML's k-nearest-neighbour search is not used;
    distances follow ``metric`` ("euclidean": squared, on the embeddings as given; "cosine").
    ``rerank`` and ``query_expansion`` are those of :func:`evaluation.reid.evaluate_reid`
    (k-reciprocal re-ranking, docs/theory.md §8; average / α query expansion, §9).
    """

    def __init__(
        self,
        ranks: tuple[int, ...] = (1, 5, 10),
        metric: str = "euclidean",
        include=(),
        exclude=(),
        device=None,
        rerank=None,
        query_expansion=None,
        **kwargs,
    ):
        from ..reid.query_expansion import as_query_expansion_options
        from ..reid.rerank import as_rerank_options

        # Validated here, so that a bad option fails when the tester is built, not after testing.
        self.rerank = as_rerank_options(rerank)
        self.query_expansion = as_query_expansion_options(query_expansion)
        if not ranks or any(not isinstance(k, int) or k < 1 for k in ranks):
            raise ValueError(f"ranks must be positive integers, got {ranks!r}")
        self.ranks, self.metric = tuple(ranks), metric
        for k in self.ranks:
            setattr(self, f"calculate_cmc_rank_{k}", partial(self._cmc_rank, k=k))
        reid_metrics = self.reid_metrics()
        unknown = (set(include) | set(exclude)) - set(reid_metrics)
        if unknown:
            raise ValueError(
                f"ReIDAccuracyCalculator computes {reid_metrics}; unknown metrics {sorted(unknown)}"
            )
        super().__init__(include=include or reid_metrics, exclude=exclude, device=device, **kwargs)

    def reid_metrics(self) -> tuple[str, ...]:
        return (*(f"cmc_rank_{k}" for k in self.ranks), "reid_mAP", "reid_mINP")

    def requires_knn(self) -> list[str]:
        return []

    def _get_accuracy(self, function_dict, **kwargs):
        result = self._evaluate(**kwargs)
        return {name: function(reid_result=result) for name, function in function_dict.items()}

    def _evaluate(self, query, reference, query_labels, reference_labels, **kwargs):
        for name, labels in (
            ("query_labels", query_labels),
            ("reference_labels", reference_labels),
        ):
            if labels.ndim != 2 or labels.shape[1] != 2:
                raise ValueError(
                    f"{name} must be (n, 2) rows of (pid, camid), got shape {tuple(labels.shape)}"
                )
        query_ids, reference_ids = (
            labels.round().long() for labels in (query_labels, reference_labels)
        )
        return evaluate_reid(
            query,
            reference,
            query_ids[:, 0],
            reference_ids[:, 0],
            query_ids[:, 1],
            reference_ids[:, 1],
            metric=self.metric,
            max_rank=max(self.ranks),
            device=self.device if isinstance(self.device, torch.device) else None,
            rerank=self.rerank,
            query_expansion=self.query_expansion,
        )

    def _cmc_rank(self, reid_result, k, **kwargs):
        return float(reid_result.cmc[min(k, len(reid_result.cmc)) - 1])

    def calculate_reid_mAP(self, reid_result: ReIDResult, **kwargs) -> float:
        return reid_result.mAP

    def calculate_reid_mINP(self, reid_result: ReIDResult, **kwargs) -> float:
        return reid_result.mINP
