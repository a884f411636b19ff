"""PML AccuracyCalculator with the camera-aware re-ID metrics: CMC rank-k, mAP and mINP."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np
import torch

from ..defaults import DEFAULT_RANKS, DEFAULT_REID_METRIC
from ..reid import ReIDResult, evaluate_reid
from ..reid.query_expansion import QueryExpansionArgument
from ..reid.rerank import RerankArgument
from ..validation import ArrayLike, DeviceLike, to_numpy
from ._pml import AccuracyCalculator


def exact_id_rows(labels: ArrayLike, name: str) -> np.ndarray:
    """``(n, 2)`` rows of ``(pid, camid)`` as exact int64.

    Integer labels are taken as they are; floating-point labels only when every value is an
    integer that the type holds exactly (below 2^24 in float32, 2^53 in float64): above that,
    neighbouring ids may already have been merged, which cannot be undone.

    Raises:
        ValueError: another shape, non-integer values, or ids a float type cannot hold exactly.
    """
    array = to_numpy(labels, name)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"{name} must be (n, 2) rows of (pid, camid), got shape {array.shape}")
    if array.dtype.kind in "iu":
        if array.dtype == np.uint64 and array.size and array.max() > np.iinfo(np.int64).max:
            raise ValueError(f"{name} holds ids above the int64 range")
        return array.astype(np.int64)
    if array.dtype.kind != "f":
        raise ValueError(f"{name} must hold integer ids, got dtype {array.dtype}")
    if not np.isfinite(array).all() or (array != np.round(array)).any():
        raise ValueError(f"{name} must hold integer ids, got non-integer values")
    exact_limit = 2.0 ** (np.finfo(array.dtype).nmant + 1)
    if array.size and np.abs(array).max() >= exact_limit:
        raise ValueError(
            f"{name} holds ids of {exact_limit:.0f} or more in {array.dtype}, which cannot tell "
            "neighbouring ids apart: pass the labels as an integer array or tensor"
        )
    return array.astype(np.int64)


class ReIDAccuracyCalculator(AccuracyCalculator):
    """Re-ID metrics of docs/theory.md §5 (``evaluation.reid.evaluate_reid``) inside PML.

    Labels carry both ids: ``query_labels`` and ``reference_labels`` are (n, 2) rows of
    ``(pid, camid)``. Metrics: ``cmc_rank_<k>`` for each k in ``ranks``, ``reid_mAP`` and
    ``reid_mINP``. When the reference includes the query (PML's ``ref_includes_query``), each
    query finds itself with its own pid and camid, which the protocol already drops as junk.
    The metrics rank every reference item, so PML's k-nearest-neighbour search is not used;
    distances follow ``metric`` ("euclidean": squared, on the embeddings as given; "cosine").
    PML casts labels to float32, which merges ids from 2^24 up, so :meth:`get_accuracy` keeps
    the ids exactly as given (see :func:`exact_id_rows`) and evaluates those.

    ``rerank`` and ``query_expansion`` are those of :func:`evaluation.reid.evaluate_reid`
    (k-reciprocal re-ranking, docs/theory.md §8; average / α query expansion, §9).
    """

    def __init__(
        self,
        ranks: tuple[int, ...] = DEFAULT_RANKS,
        metric: str = DEFAULT_REID_METRIC,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        device: DeviceLike = None,
        rerank: RerankArgument = None,
        query_expansion: QueryExpansionArgument = None,
        **kwargs,
    ) -> None:
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

    def get_accuracy(
        self,
        query: ArrayLike,
        query_labels: ArrayLike,
        reference: ArrayLike | None = None,
        reference_labels: ArrayLike | None = None,
        ref_includes_query: bool = False,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ) -> dict:
        """PML's ``get_accuracy``, evaluated on the exact ``(pid, camid)`` labels.

        Raises:
            ValueError: labels that are not ``(n, 2)`` exact integer ids (see
                :func:`exact_id_rows`), or PML's own checks.
        """
        exact_query = exact_id_rows(query_labels, "query_labels")
        exact_reference = (
            exact_query
            if reference_labels is None and reference is None
            else exact_id_rows(reference_labels, "reference_labels")
        )
        self._exact_labels = (exact_query, exact_reference)
        try:
            return super().get_accuracy(
                query,
                query_labels,
                reference,
                reference_labels,
                ref_includes_query,
                include,
                exclude,
            )
        finally:
            self._exact_labels = None

    def _get_accuracy(self, function_dict, **kwargs):
        result = self._evaluate(**kwargs)
        return {name: function(reid_result=result) for name, function in function_dict.items()}

    def _evaluate(self, query, reference, query_labels, reference_labels, **kwargs):
        exact = getattr(self, "_exact_labels", None)
        query_ids, reference_ids = exact or (
            exact_id_rows(query_labels, "query_labels"),
            exact_id_rows(reference_labels, "reference_labels"),
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
