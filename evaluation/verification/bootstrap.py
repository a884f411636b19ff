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
and a resample only needs the weighted genuine and impostor counts per run, their cumulative
sums (one compiled pass, :mod:`evaluation.verification._bootstrap_kernel`), and the same rules as :mod:`evaluation.verification.pair_metrics`
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
from ._bootstrap_kernel import count_draws, count_subject_draws, resample_metrics

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
    genuine_counts: np.ndarray,
    impostor_counts: np.ndarray,
    far_targets: np.ndarray,
    band_far: np.ndarray,
) -> np.ndarray | None:
    """AUC, EER, TAR@FAR (nearest, then threshold rule) and the TAR band of the multiset of
    pairs with the given per-run genuine and impostor multiplicities (runs in descending
    score), as one vector; None when one class is empty."""
    from ._bootstrap_kernel import resample_metrics

    num_runs = len(genuine_counts)
    out = np.empty(2 + 2 * len(far_targets) + len(band_far))
    buffers = np.empty(num_runs, dtype=np.int64), np.empty(num_runs, dtype=np.int64)
    genuine, impostor = (np.asarray(c, dtype=np.int64) for c in (genuine_counts, impostor_counts))
    if not resample_metrics(genuine, impostor, far_targets, band_far, *buffers, out):
        return None
    return out


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
    Seeded by ``numpy.random.default_rng(seed)``; per resample, pairs: ``rng.random(n_genuine)``
    then ``rng.random(n_impostor)``, a uniform ``u`` picking item ``floor(u·n)`` of its class
    (in input order); subjects: ``rng.random(num_subjects)``, picking subject ``floor(u·S)`` in
    ascending id order.

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
    # Buffers reused by every resample (see _bootstrap_kernel).
    genuine_counts = np.empty(num_runs, dtype=np.int64)
    impostor_counts = np.empty(num_runs, dtype=np.int64)
    cumulative = np.empty(num_runs, dtype=np.int64), np.empty(num_runs, dtype=np.int64)
    values = np.full((num_resamples, 2 + 2 * len(far_targets) + BAND_POINTS), np.nan)
    if subjects is None:
        genuine_uniforms, impostor_uniforms = np.empty(num_genuine), np.empty(num_impostor)
    else:
        subject_ids = check_ids(subjects, "subjects", len(scores))
        unique, subject_of_pair = np.unique(subject_ids, return_inverse=True)
        genuine_subjects = subject_of_pair[runs.genuine_pairs]
        impostor_subjects = subject_of_pair[runs.impostor_pairs]
        subject_uniforms = np.empty(len(unique))
        subject_counts = np.empty(len(unique), dtype=np.int64)
    for resample in range(num_resamples):
        if subjects is None:
            count_draws(rng.random(out=genuine_uniforms), runs.genuine_runs, genuine_counts)
            count_draws(rng.random(out=impostor_uniforms), runs.impostor_runs, impostor_counts)
        else:
            rng.random(out=subject_uniforms)
            for counts, items, item_runs in (
                (genuine_counts, genuine_subjects, runs.genuine_runs),
                (impostor_counts, impostor_subjects, runs.impostor_runs),
            ):
                count_subject_draws(subject_uniforms, subject_counts, items, item_runs, counts)
        resample_metrics(
            genuine_counts, impostor_counts, far_targets, band_far, *cumulative, values[resample]
        )
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
