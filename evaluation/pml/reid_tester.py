"""A PML tester that hands each sample's whole (pid, camid) label row to the calculator."""

from __future__ import annotations

from ..reid.query_expansion import QueryExpansionArgument
from ..reid.rerank import RerankArgument
from ._pml import AccuracyCalculator, GlobalEmbeddingSpaceTester
from .reid_accuracy_calculator import ReIDAccuracyCalculator


class ReIDTester(GlobalEmbeddingSpaceTester):
    """``GlobalEmbeddingSpaceTester`` for re-ID: datasets yield ``(image, (pid, camid))``.

    PML's tester evaluates one label column at a time; the camera-aware protocol needs both
    columns together, so this tester passes the (n, 2) label rows to a
    :class:`ReIDAccuracyCalculator` (the default) and records the metrics under level 0.
    Embeddings are not L2-normalised unless asked (``normalize_embeddings=True``), so that
    "euclidean" means the squared distance on the raw features. ``rerank`` and
    ``query_expansion`` configure the default calculator (see :class:`ReIDAccuracyCalculator`).
    """

    def __init__(
        self,
        *args,
        normalize_embeddings: bool = False,
        accuracy_calculator: AccuracyCalculator | None = None,
        rerank: RerankArgument = None,
        query_expansion: QueryExpansionArgument = None,
        **kwargs,
    ) -> None:
        if accuracy_calculator is not None and (rerank or query_expansion is not None):
            raise ValueError(
                "pass rerank / query_expansion to the ReIDAccuracyCalculator you give, not the tester"
            )
        if accuracy_calculator is None:
            accuracy_calculator = ReIDAccuracyCalculator(
                rerank=rerank, query_expansion=query_expansion
            )
        super().__init__(
            *args,
            normalize_embeddings=normalize_embeddings,
            accuracy_calculator=accuracy_calculator,
            **kwargs,
        )

    def do_knn_and_accuracies(
        self,
        accuracies: dict[str, float],
        embeddings_and_labels: dict,
        query_split_name: str,
        reference_split_names: list[str],
    ) -> None:
        query, query_labels, reference, reference_labels = self.set_reference_and_query(
            embeddings_and_labels, query_split_name, reference_split_names
        )
        self.label_levels = [0]
        metrics = self.accuracy_calculator.get_accuracy(
            query,
            query_labels,
            reference,
            reference_labels,
            self.ref_includes_query(query_split_name, reference_split_names),
        )
        for metric, value in metrics.items():
            accuracies[self.accuracies_keyname(metric)] = value
