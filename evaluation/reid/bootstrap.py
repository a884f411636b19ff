"""Per-group breakdowns and bootstrap confidence intervals of re-ID results (docs/theory.md §10).

The metrics of the camera-aware protocol are means over valid queries of per-query numbers
(AP, INP, and the CMC hit indicator ``r_1 <= k``). Query images of one identity are not
independent (same person, similar views), so the bootstrap resamples *identities*: each
resample draws as many query identities as there are, uniformly with replacement, and weighs
every valid query of a drawn identity by the number of times it was drawn; a metric of the
resample is then ``Σ_p c_p S_p / Σ_p c_p n_p`` with ``S_p`` the sum of the per-query values of
identity ``p`` and ``n_p`` its number of valid queries. Only these per-identity sums and the
(resamples, identities) count matrix are needed: nothing is re-ranked. The interval is the
percentile interval (``numpy.percentile``, linear interpolation) of the resampled metric at
``(1 − confidence)/2`` and ``(1 + confidence)/2``. The gallery is held fixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..defaults import DEFAULT_CONFIDENCE, DEFAULT_NUM_RESAMPLES, DEFAULT_SEED
from ..validation import ArrayLike, check_positive_integer

if TYPE_CHECKING:
    from .protocol import ReIDResult


def check_resampling(num_resamples: int, confidence: float) -> tuple[int, float]:
    """A positive number of resamples and a confidence level strictly between 0 and 1.

    Raises:
        ValueError: either is out of range.
    """
    num_resamples = check_positive_integer(num_resamples, "bootstrap (the number of resamples)")
    if isinstance(confidence, bool) or not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence!r}")
    return num_resamples, float(confidence)


def percentile_interval(samples: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """``(low, high)``: percentiles ``(1 ∓ confidence)/2`` of ``samples`` along axis 0."""
    low, high = np.percentile(samples, [50 * (1 - confidence), 50 * (1 + confidence)], axis=0)
    return low, high


def resampled_counts(num_groups: int, num_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(num_resamples, num_groups) multiplicities of ``num_groups`` draws with replacement."""
    draws = rng.integers(0, num_groups, (num_resamples, num_groups))
    draws += np.arange(num_resamples)[:, None] * num_groups
    return np.bincount(draws.ravel(), minlength=num_resamples * num_groups).reshape(
        num_resamples, num_groups
    )


@dataclass(frozen=True)
class ReIDIntervals:
    """Percentile bootstrap intervals of one re-ID result, over resampled query identities."""

    confidence: float
    num_resamples: int
    seed: int
    cmc_low: np.ndarray
    cmc_high: np.ndarray
    mAP_low: float
    mAP_high: float
    mINP_low: float
    mINP_high: float

    def rank(self, k: int) -> tuple[float, float]:
        """The interval of rank-k accuracy."""
        return float(self.cmc_low[k - 1]), float(self.cmc_high[k - 1])

    def as_dict(self) -> dict:
        return {
            "method": "percentile bootstrap over query identities",
            "confidence": self.confidence,
            "num_resamples": self.num_resamples,
            "seed": self.seed,
            "mAP": [self.mAP_low, self.mAP_high],
            "mINP": [self.mINP_low, self.mINP_high],
            "cmc_low": self.cmc_low.tolist(),
            "cmc_high": self.cmc_high.tolist(),
        }


def _per_query_values(result):
    """Valid-query mask, and per valid query: AP, INP and the CMC hit rates for k = 1..K."""
    valid = ~np.isnan(result.average_precision)
    max_rank = len(result.cmc)
    first = result.first_positive_ranks[valid]
    # Share of repeats (one for market1501) whose first positive lies within k, k = 1..K.
    hits = np.zeros((len(first), max_rank + 1))
    rows = np.repeat(np.arange(len(first)), first.shape[1])
    np.add.at(hits, (rows, np.minimum(first.ravel(), max_rank + 1) - 1), 1 / first.shape[1])
    hits = np.cumsum(hits, axis=1)[:, :max_rank]
    return valid, result.average_precision[valid], result.inverse_negative_penalty[valid], hits


def _check_per_query(result):
    if result.first_positive_ranks is None or result.inverse_negative_penalty is None:
        raise ValueError("this result carries no per-query ranks: build it with evaluate_reid")


def group_breakdown(result: ReIDResult, groups: ArrayLike) -> dict[int, dict]:
    """Rank-1, mAP and mINP over the valid queries of each group (e.g. query camera), with the
    group's valid and skipped query counts; metrics are None for a group without valid queries."""
    _check_per_query(result)
    groups = np.asarray(groups)
    valid, average_precision, inverse_penalty, hits = _per_query_values(result)
    labels, inverse = np.unique(groups, return_inverse=True)
    valid_inverse = inverse[valid]
    num_valid = np.bincount(valid_inverse, minlength=len(labels))
    num_all = np.bincount(inverse, minlength=len(labels))
    sums = {
        "rank1": np.bincount(valid_inverse, hits[:, 0], len(labels)),
        "mAP": np.bincount(valid_inverse, average_precision, len(labels)),
        "mINP": np.bincount(valid_inverse, inverse_penalty, len(labels)),
    }
    breakdown = {}
    for position, label in enumerate(labels.tolist()):
        count = int(num_valid[position])
        row = {
            name: (float(total[position] / count) if count else None)
            for name, total in sums.items()
        }
        row["num_valid_queries"] = count
        row["num_skipped_queries"] = int(num_all[position]) - count
        breakdown[label] = row
    return breakdown


def bootstrap_reid(
    result: ReIDResult,
    num_resamples: int = DEFAULT_NUM_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
) -> ReIDIntervals:
    """Percentile intervals of every CMC rank, mAP and mINP of ``result`` (module docstring).

    ``result`` must come from :func:`evaluation.reid.evaluate_reid` (or
    ``evaluate_reid_from_distances``), which record the query pids and per-query values.
    Seeded by ``numpy.random.default_rng(seed)``: one ``integers`` draw of shape
    (num_resamples, num_identities).

    Raises:
        ValueError: ``num_resamples`` or ``confidence`` out of range, or a result without
            query pids.
    """
    num_resamples, confidence = check_resampling(num_resamples, confidence)
    _check_per_query(result)
    if result.query_pids is None:
        raise ValueError("this result carries no query_pids: build it with evaluate_reid")
    valid, average_precision, inverse_penalty, hits = _per_query_values(result)
    identities, inverse = np.unique(result.query_pids[valid], return_inverse=True)
    num_identities = len(identities)
    per_identity = np.zeros((num_identities, hits.shape[1] + 3))
    np.add.at(
        per_identity,
        inverse,
        np.column_stack([np.ones(len(inverse)), average_precision, inverse_penalty, hits]),
    )
    counts = resampled_counts(num_identities, num_resamples, np.random.default_rng(seed))
    totals = counts @ per_identity
    means = totals[:, 1:] / totals[:, :1]
    low, high = percentile_interval(means, confidence)
    return ReIDIntervals(
        confidence=confidence,
        num_resamples=num_resamples,
        seed=seed,
        cmc_low=low[2:],
        cmc_high=high[2:],
        mAP_low=float(low[0]),
        mAP_high=float(high[0]),
        mINP_low=float(low[1]),
        mINP_high=float(high[1]),
    )
