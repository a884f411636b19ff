"""Bootstrap confidence intervals of 1:1 verification metrics (docs/theory.md §10).

Two resampling units:

- **pairs** (no subject ids): genuine and impostor pairs are resampled separately, each class
  drawn uniformly with replacement to its own size (a stratified bootstrap: the class sizes,
  hence the FAR grid, stay those of the data);
- **subjects** (``subjects`` gives one subject id per pair, e.g. that of its first image):
  subjects are drawn uniformly with replacement, as many as there are, and every pair of a
  subject drawn ``c`` times counts ``c`` times (Bolle et al.'s "subsets bootstrap"). This keeps
  the pairs of one person together, which pair resampling wrongly treats as independent.

Both give integer multiplicities of the pairs, so each resample is the metric of a multiset of
pairs, computed exactly: the scores are sorted once, each run of equal scores is one ROC point,
and a resample only needs the weighted genuine and impostor counts per run (two ``bincount``
calls), their cumulative sums, and the same rules as :mod:`evaluation.verification.pair_metrics`
(AUC as the Mann–Whitney statistic with ties counting one half, EER by linear interpolation,
TAR@FAR by the "nearest" and "threshold" rules). Intervals are percentile intervals
(``numpy.nanpercentile``, linear interpolation); a subject resample without genuine or without
impostor pairs has undefined metrics and is left out (``num_degenerate`` counts them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..reid.bootstrap import check_resampling, percentile_interval
from ..validation import check_ids
from .pair_metrics import _eer_of, _Roc, _tar_nearest

# FAR grid of the TAR band drawn on ROC figures.
BAND_POINTS = 60


@dataclass(frozen=True)
class VerificationIntervals:
    """Percentile bootstrap intervals of a verification report (see the module docstring)."""

    unit: str
    confidence: float
    num_resamples: int
    seed: int
    num_degenerate: int
    auc: tuple[float, float]
    eer: tuple[float, float]
    far_targets: np.ndarray
    tar_at_far_nearest: tuple[np.ndarray, np.ndarray]
    tar_at_far_threshold: tuple[np.ndarray, np.ndarray]
    band_far: np.ndarray
    band_tar: tuple[np.ndarray, np.ndarray]

    def as_dict(self) -> dict:
        return {
            "method": f"percentile bootstrap over {self.unit}",
            "confidence": self.confidence,
            "num_resamples": self.num_resamples,
            "seed": self.seed,
            "num_degenerate": self.num_degenerate,
            "auc": list(self.auc),
            "eer": list(self.eer),
            "tar_at_far": [
                {
                    "far": float(far),
                    "nearest": [
                        float(self.tar_at_far_nearest[0][i]),
                        float(self.tar_at_far_nearest[1][i]),
                    ],
                    "threshold": [
                        float(self.tar_at_far_threshold[0][i]),
                        float(self.tar_at_far_threshold[1][i]),
                    ],
                }
                for i, far in enumerate(self.far_targets)
            ],
        }


@dataclass(frozen=True)
class _SortedRuns:
    """Scores sorted once, descending, as runs of equal scores."""

    thresholds: np.ndarray  # one per run, descending
    genuine_runs: np.ndarray  # run of each genuine pair
    impostor_runs: np.ndarray  # run of each impostor pair
    genuine_pairs: np.ndarray  # pair index of each genuine pair (input order)
    impostor_pairs: np.ndarray

    @classmethod
    def from_pairs(cls, scores: np.ndarray, labels: np.ndarray) -> _SortedRuns:
        order = np.argsort(-scores.astype(np.float64), kind="stable")
        ordered = scores[order]
        starts = np.r_[True, ordered[1:] != ordered[:-1]]
        run_of_position = np.cumsum(starts) - 1
        run_of_pair = np.empty(len(scores), dtype=np.int64)
        run_of_pair[order] = run_of_position
        genuine_pairs, impostor_pairs = np.flatnonzero(labels), np.flatnonzero(~labels)
        return cls(
            ordered[starts].astype(np.float64),
            run_of_pair[genuine_pairs],
            run_of_pair[impostor_pairs],
            genuine_pairs,
            impostor_pairs,
        )


def weighted_metrics(
    runs: _SortedRuns,
    genuine_counts: np.ndarray,
    impostor_counts: np.ndarray,
    far_targets: np.ndarray,
    band_far: np.ndarray,
) -> np.ndarray | None:
    """AUC, EER, TAR@FAR (nearest, then threshold rule) and the TAR band of the multiset of
    pairs with the given per-run genuine and impostor multiplicities, as one vector; None when
    one class is empty."""
    true_accepts = np.cumsum(genuine_counts)
    false_accepts = np.cumsum(impostor_counts)
    num_genuine, num_impostor = true_accepts[-1], false_accepts[-1]
    if num_genuine == 0 or num_impostor == 0:
        return None
    auc = float(
        np.dot(genuine_counts, (num_impostor - false_accepts) + 0.5 * impostor_counts)
        / (num_genuine * num_impostor)
    )
    present = (genuine_counts + impostor_counts) > 0
    tar = np.r_[0.0, true_accepts[present] / num_genuine]
    far = np.r_[0.0, false_accepts[present] / num_impostor]
    run_genuine, run_impostor = genuine_counts[present], impostor_counts[present]
    if len(run_genuine) == 1:
        corners = np.zeros(1, dtype=np.int64)
    else:
        changes = (np.diff(run_genuine) != 0) | (np.diff(run_impostor) != 0)
        corners = np.flatnonzero(np.r_[True, changes[1:], True])
    curve = _Roc(None, None, None, far, tar, corners, int(num_genuine), int(num_impostor))
    nearest = _tar_nearest(curve, far_targets)
    threshold = [
        _tar_threshold_weighted(true_accepts, false_accepts, num_genuine, num_impostor, targets)
        for targets in (far_targets, band_far)
    ]
    return np.concatenate([[auc, _eer_of(curve)], nearest, threshold[0], threshold[1]])


def _tar_threshold_weighted(true_accepts, false_accepts, num_genuine, num_impostor, targets):
    # The run holding the (k+1)-th highest impostor (k = floor(FAR · I)) sets the threshold;
    # the genuine pairs strictly above it are those of the earlier runs.
    allowed = np.floor(targets * num_impostor).astype(np.int64)
    run = np.searchsorted(false_accepts, allowed + 1, side="left")
    accepted = np.where(run > 0, true_accepts[np.maximum(run - 1, 0)], 0)
    return np.where(allowed < num_impostor, accepted / num_genuine, 1.0)


def bootstrap_verification(
    scores: np.ndarray,
    labels: np.ndarray,
    far_targets: np.ndarray,
    num_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    subjects=None,
) -> VerificationIntervals:
    """Intervals of AUC, EER and TAR@FAR (both rules) of validated ``(scores, labels)``.

    ``subjects``: one integer subject id per pair to resample subjects; pairs otherwise.
    Seeded by ``numpy.random.default_rng(seed)``; per resample, pairs: one ``integers`` draw
    for the genuine pairs then one for the impostors; subjects: one draw over the subjects.

    Raises:
        ValueError: ``num_resamples``/``confidence`` out of range, ``subjects`` of the wrong
            length or type, or every subject resample degenerate.
    """
    num_resamples, confidence = check_resampling(num_resamples, confidence)
    runs = _SortedRuns.from_pairs(scores, labels)
    num_runs = len(runs.thresholds)
    num_genuine, num_impostor = len(runs.genuine_pairs), len(runs.impostor_pairs)
    band_far = np.geomspace(1 / num_impostor, 1.0, BAND_POINTS)
    rng = np.random.default_rng(seed)
    if subjects is not None:
        subject_ids = check_ids(subjects, "subjects", len(scores))
        unique, subject_of_pair = np.unique(subject_ids, return_inverse=True)
        genuine_subjects = subject_of_pair[runs.genuine_pairs]
        impostor_subjects = subject_of_pair[runs.impostor_pairs]

    num_values = 2 + 2 * len(far_targets) + BAND_POINTS
    samples = []
    for _ in range(num_resamples):
        if subjects is None:
            genuine = runs.genuine_runs[rng.integers(0, num_genuine, num_genuine)]
            impostor = runs.impostor_runs[rng.integers(0, num_impostor, num_impostor)]
            genuine_counts = np.bincount(genuine, minlength=num_runs)
            impostor_counts = np.bincount(impostor, minlength=num_runs)
        else:
            drawn = np.bincount(rng.integers(0, len(unique), len(unique)), minlength=len(unique))
            genuine_counts = np.bincount(
                runs.genuine_runs, drawn[genuine_subjects], minlength=num_runs
            ).astype(np.int64)
            impostor_counts = np.bincount(
                runs.impostor_runs, drawn[impostor_subjects], minlength=num_runs
            ).astype(np.int64)
        metrics = weighted_metrics(runs, genuine_counts, impostor_counts, far_targets, band_far)
        samples.append(np.full(num_values, np.nan) if metrics is None else metrics)
    values = np.array(samples)
    kept = ~np.isnan(values[:, 0])
    if not kept.any():
        raise ValueError("every subject resample lacks genuine or impostor pairs")
    low, high = percentile_interval(values[kept], confidence)
    num_targets = len(far_targets)
    parts = np.cumsum([1, 1, num_targets, num_targets])
    return VerificationIntervals(
        unit="subjects" if subjects is not None else "pairs (stratified by label)",
        confidence=confidence,
        num_resamples=num_resamples,
        seed=seed,
        num_degenerate=int((~kept).sum()),
        auc=(float(low[0]), float(high[0])),
        eer=(float(low[1]), float(high[1])),
        far_targets=far_targets,
        tar_at_far_nearest=(low[parts[1] : parts[2]], high[parts[1] : parts[2]]),
        tar_at_far_threshold=(low[parts[2] : parts[3]], high[parts[2] : parts[3]]),
        band_far=band_far,
        band_tar=(low[parts[3] :], high[parts[3] :]),
    )
