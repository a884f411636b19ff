"""1:1 verification metrics over scored pairs: ROC, AUC, EER and TAR@FAR.

Scores follow "larger is more similar" (cosine similarity); labels are 1 (or True) for genuine
pairs (same identity) and 0 for impostor pairs. Every metric starts from one ``np.sort`` of the
scores and one of the (few) genuine scores: a compiled pass from the top score down then reads
each run of equal scores as one ROC point, taking its genuine count from a second pointer into
the sorted genuine scores (:mod:`evaluation.verification._roc_kernel`). No argsort of all pairs is needed,
which is what makes this several times faster than ``sklearn.metrics.roc_curve`` on millions of
pairs while giving the same point set bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..validation import check_binary_labels, check_scores, to_numpy

TAR_AT_FAR_RULES = ("nearest", "threshold")
DEFAULT_FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass(frozen=True)
class _Roc:
    """The full ROC from one sort, plus what the other metrics reuse."""

    sorted_scores: np.ndarray  # all scores, ascending, input dtype
    genuine_sorted: np.ndarray  # genuine scores, ascending, input dtype
    thresholds: np.ndarray  # float64, [+inf, distinct scores descending]
    far: np.ndarray  # float64, [0, impostors scoring >= threshold / n_impostor]
    tar: np.ndarray  # float64, [0, genuine scoring >= threshold / n_genuine]
    corners: np.ndarray  # points (index into far[1:]) kept by drop_intermediate=True
    n_genuine: int
    n_impostor: int


def check_pair_scores(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(scores, labels)``: finite 1-D scores, binary labels of the same length,
    and both classes present (every ROC quantity divides by both class sizes)."""
    score_array = check_scores(scores, "scores")
    label_array = check_binary_labels(labels, "labels", length=score_array.shape[0])
    n_genuine = int(np.count_nonzero(label_array))
    if n_genuine == 0 or n_genuine == label_array.shape[0]:
        kind = "impostor (0)" if n_genuine else "genuine (1)"
        raise ValueError(f"labels contain no {kind} pairs: the ROC is undefined with one class")
    return score_array, label_array


def _sorted_roc(scores: np.ndarray, labels: np.ndarray) -> _Roc:
    from ._roc_kernel import fresh_copy, roc_arrays

    sorted_scores = fresh_copy(scores)
    sorted_scores.sort()
    genuine_sorted = np.sort(scores[labels])
    n_genuine = genuine_sorted.shape[0]
    n_impostor = sorted_scores.shape[0] - n_genuine
    thresholds, far, tar, corners = roc_arrays(sorted_scores, genuine_sorted, n_genuine, n_impostor)
    return _Roc(sorted_scores, genuine_sorted, thresholds, far, tar, corners, n_genuine, n_impostor)


def roc(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The full ROC curve: ``(far, tar, thresholds)``, float64, from the strictest threshold.

    Point ``i >= 1`` accepts the pairs with ``score >= thresholds[i]``: ``far[i]`` is the share of
    impostor pairs accepted, ``tar[i]`` the share of genuine pairs accepted. Point 0 is
    ``(0, 0)`` at threshold ``+inf``; there is one point per distinct score. The arrays equal
    ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)`` exactly.
    """
    curve = _sorted_roc(*check_pair_scores(scores, labels))
    return curve.far, curve.tar, curve.thresholds


def _auc_of(curve: _Roc) -> float:
    # Area under the ROC = P(genuine score > impostor score) + P(tie) / 2 (Mann-Whitney),
    # counted exactly in integers for each genuine score, then divided once.
    genuine = curve.genuine_sorted
    all_below = np.searchsorted(curve.sorted_scores, genuine, side="left")
    all_at_or_below = np.searchsorted(curve.sorted_scores, genuine, side="right")
    genuine_below = np.searchsorted(genuine, genuine, side="left")
    genuine_at_or_below = np.searchsorted(genuine, genuine, side="right")
    impostors_below = all_below - genuine_below
    impostors_tied = (all_at_or_below - all_below) - (genuine_at_or_below - genuine_below)
    doubled_wins = 2 * int(impostors_below.sum()) + int(impostors_tied.sum())
    return doubled_wins / (2 * curve.n_genuine * curve.n_impostor)


def auc(scores, labels) -> float:
    """Area under the ROC curve (equals ``sklearn.metrics.roc_auc_score`` up to rounding).

    Computed as the Mann-Whitney statistic: the share of (genuine, impostor) combinations where
    the genuine pair scores higher, ties counting one half.
    """
    return _auc_of(_sorted_roc(*check_pair_scores(scores, labels)))


def _eer_of(curve: _Roc) -> float:
    far, tar = curve.far, curve.tar
    # far - (1 - tar) never decreases along the curve: bisect for the first point where it is >= 0.
    low, high = 0, far.shape[0] - 1  # the gap is -1 at the first point and +1 at the last

    def gap(index: int) -> float:
        return far[index] - (1.0 - tar[index])

    while high - low > 1:
        middle = (low + high) // 2
        if gap(middle) >= 0:
            high = middle
        else:
            low = middle
    gap_low, gap_high = gap(low), gap(high)
    if gap_high == 0:
        return float(far[high])
    return float(far[low] + (-gap_low / (gap_high - gap_low)) * (far[high] - far[low]))


def eer(scores, labels) -> float:
    """Equal error rate: the FAR where FAR = 1 - TAR on the ROC of :func:`roc`, interpolated
    linearly along the segment where ``FAR - (1 - TAR)`` changes sign."""
    return _eer_of(_sorted_roc(*check_pair_scores(scores, labels)))


def check_far_targets(far_targets) -> np.ndarray:
    targets = to_numpy(far_targets, "far_targets").astype(np.float64, copy=False)
    targets = np.atleast_1d(targets)
    if targets.ndim != 1 or targets.size == 0:
        raise ValueError("far_targets must be a non-empty scalar or 1-D sequence")
    if not (np.isfinite(targets).all() and ((targets >= 0) & (targets <= 1)).all()):
        raise ValueError(f"far_targets must lie in [0, 1], got {targets}")
    return targets


def _tar_nearest(curve: _Roc, targets: np.ndarray) -> np.ndarray:
    # sklearn's drop_intermediate curve: (0, 0), then the corner points; FAR never decreases
    # along it, so the nearest FAR is the last one <= target or the first one above it.
    kept = np.concatenate([[0], curve.corners + 1])
    far = curve.far[kept]
    result = np.empty(targets.shape[0])
    for position, target in enumerate(targets):
        above = int(np.searchsorted(far, target, side="right"))
        below = above - 1
        if above < far.shape[0] and far[above] - target <= target - far[below]:
            # Ties go to the larger FAR, and among equal FARs to the last (largest TAR) point.
            chosen = int(np.searchsorted(far, far[above], side="right")) - 1
        else:
            chosen = below
        result[position] = curve.tar[kept[chosen]]
    return result


def _tar_threshold(curve: _Roc, targets: np.ndarray) -> np.ndarray:
    n_impostor = curve.n_impostor
    allowed = np.floor(targets * n_impostor).astype(np.int64)
    inside = allowed < n_impostor
    # The (k+1)-th highest impostor score is the first threshold with at least k + 1 impostors
    # at or above it. far = count / n_impostor is strictly increasing in the count, so the
    # search runs on far itself; when k >= n_impostor every pair is accepted.
    point = np.searchsorted(curve.far, (allowed[inside] + 1) / n_impostor, side="left")
    genuine_sorted = curve.genuine_sorted.astype(np.float64)
    above = genuine_sorted.shape[0] - np.searchsorted(
        genuine_sorted, curve.thresholds[point], side="right"
    )
    result = np.ones(targets.shape[0])
    result[inside] = above / curve.n_genuine
    return result


def tar_at_far(
    scores, labels, far_targets=DEFAULT_FAR_TARGETS, rule: str = "nearest"
) -> np.ndarray:
    """TAR at each target FAR, one value per target (float64 array).

    ``rule="nearest"`` (what IJB-B/C papers report): on the ROC that
    ``sklearn.metrics.roc_curve`` returns with its default ``drop_intermediate=True``, take the
    point whose FAR is closest to the target, ties going to the larger FAR (and, among points of
    equal FAR, to the larger TAR).
    ``rule="threshold"``: accept a pair when its score is strictly above ``t``, the (k+1)-th
    highest impostor score with ``k = floor(FAR * n_impostor)``, so at most ``k`` impostors pass;
    TAR is the share of genuine pairs strictly above ``t`` (all pairs pass when
    ``k >= n_impostor``).
    """
    if rule not in TAR_AT_FAR_RULES:
        raise ValueError(f"rule must be one of {TAR_AT_FAR_RULES}, got {rule!r}")
    targets = check_far_targets(far_targets)
    score_array, label_array = check_pair_scores(scores, labels)
    if rule == "threshold":
        return _tar_threshold_by_partition(score_array, label_array, targets)
    return _tar_nearest(_sorted_roc(score_array, label_array), targets)


def _tar_threshold_by_partition(
    score_array: np.ndarray, label_array: np.ndarray, targets: np.ndarray
) -> np.ndarray:
    # Only the impostor scores need ordering, and only at the k-th positions: np.partition.
    impostor = score_array[~label_array]
    genuine = score_array[label_array]
    n_impostor = impostor.shape[0]
    allowed = np.floor(targets * n_impostor).astype(np.int64)
    inside = allowed < n_impostor
    result = np.ones(targets.shape[0])
    if inside.any():
        # The (k+1)-th highest impostor score sits at ascending position n_impostor - 1 - k.
        positions = n_impostor - 1 - allowed[inside]
        cuts = np.partition(impostor, np.unique(positions))[positions]
        genuine_sorted = np.sort(genuine)
        above = genuine.shape[0] - np.searchsorted(genuine_sorted, cuts, side="right")
        result[inside] = above / genuine.shape[0]
    return result


@dataclass(frozen=True)
class VerificationReport:
    """Every 1:1 metric of one set of scored pairs (see :func:`verification_report`)."""

    far: np.ndarray
    tar: np.ndarray
    thresholds: np.ndarray
    auc: float
    eer: float
    far_targets: np.ndarray
    tar_at_far_nearest: np.ndarray
    tar_at_far_threshold: np.ndarray
    n_genuine: int
    n_impostor: int
    intervals: object | None = None  # VerificationIntervals when a bootstrap was asked for

    def as_dict(self) -> dict:
        """A JSON-ready summary (the curve itself left out)."""
        summary = {
            "n_genuine": self.n_genuine,
            "n_impostor": self.n_impostor,
            "auc": self.auc,
            "eer": self.eer,
            "tar_at_far": [
                {"far": float(far), "nearest": float(nearest), "threshold": float(threshold)}
                for far, nearest, threshold in zip(
                    self.far_targets,
                    self.tar_at_far_nearest,
                    self.tar_at_far_threshold,
                    strict=True,
                )
            ],
        }
        if self.intervals is not None:
            summary["intervals"] = self.intervals.as_dict()
        return summary


def verification_report(
    scores,
    labels,
    far_targets=DEFAULT_FAR_TARGETS,
    *,
    bootstrap: int | None = None,
    subjects=None,
    seed: int = 0,
    confidence: float = 0.95,
) -> VerificationReport:
    """ROC, AUC, EER and TAR@FAR (both rules) from one sort of the scores.

    Each quantity is defined as in :func:`roc`, :func:`auc`, :func:`eer` and :func:`tar_at_far`.
    ``bootstrap``: a number of resamples attaches percentile intervals (``confidence``, seeded
    by ``seed``) as ``report.intervals``, resampling the subjects given by ``subjects`` (one id
    per pair) or else the pairs (docs/theory.md §10,
    :func:`evaluation.verification.bootstrap.bootstrap_verification`).
    """
    targets = check_far_targets(far_targets)
    score_array, label_array = check_pair_scores(scores, labels)
    curve = _sorted_roc(score_array, label_array)
    intervals = None
    if bootstrap is not None:
        from .bootstrap import bootstrap_verification

        intervals = bootstrap_verification(
            score_array, label_array, targets, bootstrap, seed, confidence, subjects
        )
    elif subjects is not None:
        raise ValueError("subjects are only used by the bootstrap: pass bootstrap=")
    return VerificationReport(
        far=curve.far,
        tar=curve.tar,
        thresholds=curve.thresholds,
        auc=_auc_of(curve),
        eer=_eer_of(curve),
        far_targets=targets,
        tar_at_far_nearest=_tar_nearest(curve, targets),
        tar_at_far_threshold=_tar_threshold(curve, targets),
        n_genuine=curve.n_genuine,
        n_impostor=curve.n_impostor,
        intervals=intervals,
    )
