"""1:1 verification metrics over scored pairs: ROC, AUC, EER and TAR@FAR.

Scores follow "larger is more similar" (cosine similarity); labels are 1 (or True) for genuine
pairs (same identity) and 0 for impostor pairs. Every metric starts from one ``np.sort`` of the
scores and one of the (few) genuine scores: a compiled pass from the top score down then reads
each run of equal scores as one ROC point, taking its genuine count from a second pointer into
the sorted genuine scores (:mod:`evaluation.verification._roc_kernel`). No argsort of all pairs is needed,
which is what makes this several times faster than ``sklearn.metrics.roc_curve`` on millions of
pairs while giving the same point set bit for bit.

One :class:`RocCurve` holds that sort; every metric accepts one in place of ``(scores, labels)``,
so that all the metrics of one score set share one sort::

    curve = RocCurve.from_scores(scores, labels)
    far, tar, thresholds = roc(curve)
    auc(curve), eer(curve), tar_at_far(curve, far_targets=[1e-4, 1e-3])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._deprecation import DeprecatedAlias, RenamedKeysDict, renamed_keys
from ..defaults import DEFAULT_CONFIDENCE, DEFAULT_FAR_TARGETS, DEFAULT_SEED
from ..validation import ArrayLike, check_binary_labels, check_scores, to_numpy

TAR_AT_FAR_RULES = ("nearest", "threshold")
_RENAMED_KEYS = renamed_keys(
    "VerificationReport", n_genuine="num_genuine", n_impostor="num_impostor"
)


@dataclass(frozen=True)
class RocCurve:
    """The full ROC of one set of scored pairs, from one sort, with what the other metrics reuse.

    Build it with :meth:`from_scores`; pass it to :func:`roc`, :func:`auc`, :func:`eer`,
    :func:`tar_at_far` or :func:`verification_report` in place of ``(scores, labels)``.
    ``far``, ``tar`` and ``thresholds`` are the arrays :func:`roc` returns.
    """

    sorted_scores: np.ndarray  # all scores, ascending, input dtype
    genuine_sorted: np.ndarray  # genuine scores, ascending, input dtype
    thresholds: np.ndarray  # float64, [+inf, distinct scores descending]
    far: np.ndarray  # float64, [0, impostors scoring >= threshold / num_impostor]
    tar: np.ndarray  # float64, [0, genuine scoring >= threshold / num_genuine]
    corners: np.ndarray  # points (index into far[1:]) kept by drop_intermediate=True
    num_genuine: int
    num_impostor: int
    n_genuine = DeprecatedAlias("num_genuine")
    n_impostor = DeprecatedAlias("num_impostor")

    @classmethod
    def from_scores(cls, scores: ArrayLike, labels: ArrayLike) -> RocCurve:
        """The curve of ``scores`` (larger is more similar) with 0/1 ``labels`` (1 genuine).

        Raises:
            ValueError: see :func:`check_pair_scores`.
        """
        return _sorted_roc(*check_pair_scores(scores, labels))


def check_pair_scores(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(scores, labels)``: finite 1-D scores (integer scores kept exact), binary
    labels of the same length, and both classes present (every ROC quantity divides by both
    class sizes)."""
    score_array = check_scores(scores, "scores")
    label_array = check_binary_labels(labels, "labels", length=score_array.shape[0])
    num_genuine = int(np.count_nonzero(label_array))
    if num_genuine == 0 or num_genuine == label_array.shape[0]:
        kind = "impostor (0)" if num_genuine else "genuine (1)"
        raise ValueError(f"labels contain no {kind} pairs: the ROC is undefined with one class")
    return score_array, label_array


def _sorted_roc(scores: np.ndarray, labels: np.ndarray) -> RocCurve:
    from ._roc_kernel import fresh_copy, roc_arrays

    sorted_scores = fresh_copy(scores)
    sorted_scores.sort()
    genuine_sorted = np.sort(scores[labels])
    num_genuine = genuine_sorted.shape[0]
    num_impostor = sorted_scores.shape[0] - num_genuine
    thresholds, far, tar, corners = roc_arrays(
        sorted_scores, genuine_sorted, num_genuine, num_impostor
    )
    _sign_zero_threshold_as_sklearn(scores, sorted_scores, thresholds)
    return RocCurve(
        sorted_scores, genuine_sorted, thresholds, far, tar, corners, num_genuine, num_impostor
    )


def _sign_zero_threshold_as_sklearn(scores, sorted_scores, thresholds) -> None:
    # +0.0 and -0.0 are one score; sklearn's threshold is the first of them in input order (its
    # stable sort, reversed), the sort here keeps either. Only the zero run can differ this way.
    if scores.dtype.kind != "f":
        return
    zero = sorted_scores.dtype.type(0)
    if np.searchsorted(sorted_scores, zero, "left") == np.searchsorted(
        sorted_scores, zero, "right"
    ):
        return
    first_zero = scores[int(np.argmax(scores == 0))]
    thresholds[thresholds == 0] = first_zero


def _curve_of(scores, labels) -> RocCurve:
    """A given :class:`RocCurve`, or the curve of ``(scores, labels)``."""
    if isinstance(scores, RocCurve):
        if labels is not None:
            raise ValueError("labels go with scores, not with a RocCurve")
        return scores
    if labels is None:
        raise ValueError("labels are required with scores (or pass a RocCurve)")
    return _sorted_roc(*check_pair_scores(scores, labels))


def roc(
    scores: ArrayLike | RocCurve, labels: ArrayLike | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The full ROC curve: ``(far, tar, thresholds)``, float64, from the strictest threshold.

    Point ``i >= 1`` accepts the pairs with ``score >= thresholds[i]``: ``far[i]`` is the share of
    impostor pairs accepted, ``tar[i]`` the share of genuine pairs accepted. Point 0 is
    ``(0, 0)`` at threshold ``+inf``; there is one point per distinct score (integer scores are
    compared exactly, also above 2^53). The arrays equal
    ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)`` exactly, including
    the sign of a zero threshold (that of the first zero score in input order).

    ``scores`` may be a :class:`RocCurve` (then without ``labels``).

    Raises:
        ValueError: see :func:`check_pair_scores`.
    """
    curve = _curve_of(scores, labels)
    return curve.far, curve.tar, curve.thresholds


def _auc_of(curve: RocCurve) -> float:
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
    return doubled_wins / (2 * curve.num_genuine * curve.num_impostor)


def auc(scores: ArrayLike | RocCurve, labels: ArrayLike | None = None) -> float:
    """Area under the ROC curve (equals ``sklearn.metrics.roc_auc_score`` up to rounding).

    Computed as the Mann-Whitney statistic: the share of (genuine, impostor) combinations where
    the genuine pair scores higher, ties counting one half. ``scores`` may be a
    :class:`RocCurve`.
    """
    return _auc_of(_curve_of(scores, labels))


def _eer_of(curve: RocCurve) -> float:
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


def eer(scores: ArrayLike | RocCurve, labels: ArrayLike | None = None) -> float:
    """Equal error rate: the FAR where FAR = 1 - TAR on the ROC of :func:`roc`, interpolated
    linearly along the segment where ``FAR - (1 - TAR)`` changes sign. ``scores`` may be a
    :class:`RocCurve`."""
    return _eer_of(_curve_of(scores, labels))


def false_accepts_allowed(targets: np.ndarray, total: int) -> np.ndarray:
    """For each target rate, the largest count ``k`` in ``[0, total]`` with
    ``k / total <= target``, the rate computed as the ROC computes it (one correctly rounded
    division): ``floor(target · total)`` counted exactly. Floating point alone gets it one short
    for some targets (``0.29 * 100 == 28.999999999999996``)."""
    counts = np.floor(targets * total).astype(np.int64)
    counts += (counts < total) & ((counts + 1) / total <= targets)
    counts -= counts / total > targets
    return counts


def check_far_targets(far_targets: ArrayLike | float) -> np.ndarray:
    targets = to_numpy(far_targets, "far_targets").astype(np.float64, copy=False)
    targets = np.atleast_1d(targets)
    if targets.ndim != 1 or targets.size == 0:
        raise ValueError("far_targets must be a non-empty scalar or 1-D sequence")
    if not (np.isfinite(targets).all() and ((targets >= 0) & (targets <= 1)).all()):
        raise ValueError(f"far_targets must lie in [0, 1], got {targets}")
    return targets


def _tar_nearest(curve: RocCurve, targets: np.ndarray) -> np.ndarray:
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


def _tar_threshold(curve: RocCurve, targets: np.ndarray) -> np.ndarray:
    num_impostor = curve.num_impostor
    allowed = false_accepts_allowed(targets, num_impostor)
    inside = allowed < num_impostor
    # The (k+1)-th highest impostor score t is the threshold of the first point with at least
    # k + 1 impostors at or above it. far = count / num_impostor is strictly increasing in the
    # count, so the search runs on far itself; when k >= num_impostor every pair is accepted.
    point = np.searchsorted(curve.far, (allowed[inside] + 1) / num_impostor, side="left")
    # The point before accepts exactly the scores above t (the next distinct score up), so its
    # TAR is the share of genuine pairs strictly above t, read without comparing scores.
    result = np.ones(targets.shape[0])
    result[inside] = curve.tar[point - 1]
    return result


def tar_at_far(
    scores: ArrayLike | RocCurve,
    labels: ArrayLike | None = None,
    far_targets: ArrayLike | float = DEFAULT_FAR_TARGETS,
    rule: str = "nearest",
) -> np.ndarray:
    """TAR at each target FAR, one value per target (float64 array).

    ``rule="nearest"`` (what IJB-B/C papers report): on the ROC that
    ``sklearn.metrics.roc_curve`` returns with its default ``drop_intermediate=True``, take the
    point whose FAR is closest to the target, ties going to the larger FAR (and, among points of
    equal FAR, to the larger TAR).
    ``rule="threshold"``: accept a pair when its score is strictly above ``t``, the (k+1)-th
    highest impostor score with ``k = floor(FAR * num_impostor)`` counted exactly (the largest
    ``k`` with ``k / num_impostor <= FAR``, see :func:`false_accepts_allowed`), so at most ``k``
    impostors pass; TAR is the share of genuine pairs strictly above ``t`` (all pairs pass when
    ``k >= num_impostor``).

    Both rules agree with insightface's IJB evaluation, which flips the ROC before its
    first-minimum search ("select largest tpr at same fpr"). ``scores`` may be a
    :class:`RocCurve` (then without ``labels``); from raw scores the threshold rule needs no
    full sort (``np.partition``).

    Raises:
        ValueError: bad scores or labels (:func:`check_pair_scores`), targets outside
            ``[0, 1]`` or an unknown ``rule``.
    """
    if rule not in TAR_AT_FAR_RULES:
        raise ValueError(f"rule must be one of {TAR_AT_FAR_RULES}, got {rule!r}")
    targets = check_far_targets(far_targets)
    if isinstance(scores, RocCurve) or rule == "nearest":
        curve = _curve_of(scores, labels)
        return (_tar_nearest if rule == "nearest" else _tar_threshold)(curve, targets)
    if labels is None:
        raise ValueError("labels are required with scores (or pass a RocCurve)")
    return _tar_threshold_by_partition(*check_pair_scores(scores, labels), targets)


def _tar_threshold_by_partition(
    score_array: np.ndarray, label_array: np.ndarray, targets: np.ndarray
) -> np.ndarray:
    # Only the impostor scores need ordering, and only at the k-th positions: np.partition.
    impostor = score_array[~label_array]
    genuine = score_array[label_array]
    num_impostor = impostor.shape[0]
    allowed = false_accepts_allowed(targets, num_impostor)
    inside = allowed < num_impostor
    result = np.ones(targets.shape[0])
    if inside.any():
        # The (k+1)-th highest impostor score sits at ascending position num_impostor - 1 - k.
        positions = num_impostor - 1 - allowed[inside]
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
    num_genuine: int
    num_impostor: int
    intervals: object | None = None  # VerificationIntervals when a bootstrap was asked for
    n_genuine = DeprecatedAlias("num_genuine")
    n_impostor = DeprecatedAlias("num_impostor")

    def as_dict(self) -> dict:
        """A JSON-ready summary (the curve itself left out)."""
        summary = {
            "num_genuine": self.num_genuine,
            "num_impostor": self.num_impostor,
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
        return RenamedKeysDict(summary, _RENAMED_KEYS)


def verification_report(
    scores: ArrayLike | RocCurve,
    labels: ArrayLike | None = None,
    far_targets: ArrayLike | float = DEFAULT_FAR_TARGETS,
    *,
    bootstrap: int | None = None,
    subjects: ArrayLike | None = None,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
) -> VerificationReport:
    """ROC, AUC, EER and TAR@FAR (both rules) from one sort of the scores.

    Each quantity is defined as in :func:`roc`, :func:`auc`, :func:`eer` and :func:`tar_at_far`.
    ``scores`` may be a :class:`RocCurve` (then without ``labels``, and without ``bootstrap``).
    ``bootstrap``: a number of resamples attaches percentile intervals (``confidence``, seeded
    by ``seed``) as ``report.intervals``, resampling the subjects given by ``subjects`` (one id
    per pair) or else the pairs (docs/theory.md §10,
    :func:`evaluation.verification.bootstrap.bootstrap_verification`).
    """
    targets = check_far_targets(far_targets)
    curve = _curve_of(scores, labels)
    intervals = None
    if bootstrap is not None:
        if isinstance(scores, RocCurve):
            raise ValueError("bootstrap= needs the scores and labels, not a RocCurve")
        from .bootstrap import bootstrap_verification

        score_array, label_array = check_pair_scores(scores, labels)
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
        num_genuine=curve.num_genuine,
        num_impostor=curve.num_impostor,
        intervals=intervals,
    )
