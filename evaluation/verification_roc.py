"""1:1 verification metrics over scored pairs: ROC, AUC, EER and TAR@FAR.

Scores follow "larger is more similar" (cosine similarity); labels are 1 (or True) for genuine
pairs (same identity) and 0 for impostor pairs. Every metric starts from one ``np.sort`` of the
scores: the ROC point at each distinct score ``v`` counts the pairs with score ``>= v`` (from the
sorted scores) and the genuine pairs among them (a ``searchsorted`` of every threshold into the
sorted genuine scores, which are few). No argsort of all pairs is needed, which is what makes
this several times faster than ``sklearn.metrics.roc_curve`` on millions of pairs while giving the
same point set bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._validation import check_binary_labels, check_scores, to_numpy

TAR_AT_FAR_RULES = ("nearest", "threshold")
DEFAULT_FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# Points per slice when finding the ROC corners, to bound temporary memory on huge curves.
_CORNER_CHUNK = 1 << 20


@dataclass(frozen=True)
class _RocCounts:
    """Cumulative counts at each distinct score, highest score first (sklearn's order)."""

    sorted_scores: np.ndarray  # all scores, ascending, input dtype
    genuine_sorted: np.ndarray  # genuine scores, ascending, input dtype
    thresholds: np.ndarray  # float64, distinct scores in descending order
    tps: np.ndarray  # int64, genuine pairs scoring >= threshold
    fps: np.ndarray  # int64, impostor pairs scoring >= threshold

    @property
    def n_genuine(self) -> int:
        return int(self.tps[-1])

    @property
    def n_impostor(self) -> int:
        return int(self.fps[-1])


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


def _roc_counts(scores: np.ndarray, labels: np.ndarray) -> _RocCounts:
    sorted_scores = np.sort(scores)
    n = sorted_scores.shape[0]
    # First index (ascending order) of each run of equal scores, listed from the highest run:
    # n - first is then the number of pairs scoring >= that run's value.
    run_starts = np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1])
    first = np.empty(run_starts.shape[0] + 1, dtype=np.int64)
    first[:-1] = run_starts[::-1]
    first[:-1] += 1
    first[-1] = 0
    del run_starts
    thresholds = sorted_scores[first].astype(np.float64, copy=False)
    genuine_sorted = np.sort(scores[labels])
    tps = np.searchsorted(genuine_sorted.astype(np.float64), thresholds, side="left")
    np.subtract(genuine_sorted.shape[0], tps, out=tps)
    fps = first
    np.subtract(n, fps, out=fps)
    fps -= tps
    return _RocCounts(
        sorted_scores, genuine_sorted, thresholds, tps.astype(np.int64, copy=False), fps
    )


def _rates(counts: np.ndarray, total: int) -> np.ndarray:
    """``[0, counts / total]`` in float64, the division sklearn performs."""
    rates = np.empty(counts.shape[0] + 1, dtype=np.float64)
    rates[0] = 0.0
    np.divide(counts, total, out=rates[1:])
    return rates


def _roc_from_counts(counts: _RocCounts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    thresholds = np.empty(counts.thresholds.shape[0] + 1, dtype=np.float64)
    thresholds[0] = np.inf
    thresholds[1:] = counts.thresholds
    far = _rates(counts.fps, counts.n_impostor)
    tar = _rates(counts.tps, counts.n_genuine)
    return far, tar, thresholds


def roc(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The full ROC curve: ``(far, tar, thresholds)``, float64, from the strictest threshold.

    Point ``i >= 1`` accepts the pairs with ``score >= thresholds[i]``: ``far[i]`` is the share of
    impostor pairs accepted, ``tar[i]`` the share of genuine pairs accepted. Point 0 is
    ``(0, 0)`` at threshold ``+inf``; there is one point per distinct score. The arrays equal
    ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)`` exactly.
    """
    return _roc_from_counts(_roc_counts(*check_pair_scores(scores, labels)))


def _auc_from_counts(counts: _RocCounts) -> float:
    # Area under the ROC = P(genuine score > impostor score) + P(tie) / 2 (Mann-Whitney),
    # counted exactly in integers for each genuine score, then divided once.
    genuine = counts.genuine_sorted
    all_below = np.searchsorted(counts.sorted_scores, genuine, side="left")
    all_at_or_below = np.searchsorted(counts.sorted_scores, genuine, side="right")
    genuine_below = np.searchsorted(genuine, genuine, side="left")
    genuine_at_or_below = np.searchsorted(genuine, genuine, side="right")
    impostors_below = all_below - genuine_below
    impostors_tied = (all_at_or_below - all_below) - (genuine_at_or_below - genuine_below)
    doubled_wins = 2 * int(impostors_below.sum()) + int(impostors_tied.sum())
    return doubled_wins / (2 * counts.n_genuine * counts.n_impostor)


def auc(scores, labels) -> float:
    """Area under the ROC curve (equals ``sklearn.metrics.roc_auc_score`` up to rounding).

    Computed as the Mann-Whitney statistic: the share of (genuine, impostor) combinations where
    the genuine pair scores higher, ties counting one half.
    """
    return _auc_from_counts(_roc_counts(*check_pair_scores(scores, labels)))


def _point(counts: _RocCounts, index: int) -> tuple[float, float]:
    """ROC point ``index`` of :func:`roc` as ``(far, tar)``, without building the arrays."""
    if index == 0:
        return 0.0, 0.0
    return (
        float(np.float64(counts.fps[index - 1]) / counts.n_impostor),
        float(np.float64(counts.tps[index - 1]) / counts.n_genuine),
    )


def _eer_from_counts(counts: _RocCounts) -> float:
    # far - (1 - tar) never decreases along the curve: bisect for the first point where it is >= 0.
    def gap(index: int) -> float:
        far, tar = _point(counts, index)
        return far - (1.0 - tar)

    low, high = 0, counts.tps.shape[0]  # gap(low) = -1 < 0, gap(high) = 1 >= 0
    while high - low > 1:
        middle = (low + high) // 2
        if gap(middle) >= 0:
            high = middle
        else:
            low = middle
    gap_low, gap_high = gap(low), gap(high)
    far_low, _ = _point(counts, low)
    far_high, _ = _point(counts, high)
    if gap_high == 0:
        return far_high
    return far_low + (-gap_low / (gap_high - gap_low)) * (far_high - far_low)


def eer(scores, labels) -> float:
    """Equal error rate: the FAR where FAR = 1 - TAR on the ROC of :func:`roc`, interpolated
    linearly along the segment where ``FAR - (1 - TAR)`` changes sign."""
    return _eer_from_counts(_roc_counts(*check_pair_scores(scores, labels)))


def _corner_indices(counts: _RocCounts) -> np.ndarray:
    """Indices (into ``counts``) of the points ``roc_curve(drop_intermediate=True)`` keeps: the
    first, the last, and each point whose two neighbouring steps differ in fps or in tps."""
    fps, tps = counts.fps, counts.tps
    size = fps.shape[0]
    if size <= 2:
        return np.arange(size)
    pieces = [np.zeros(1, dtype=np.int64)]
    for start in range(1, size - 1, _CORNER_CHUNK):
        stop = min(start + _CORNER_CHUNK, size - 1)
        window = slice(start - 1, stop + 1)
        bends = (np.diff(fps[window], 2) != 0) | (np.diff(tps[window], 2) != 0)
        pieces.append(np.flatnonzero(bends) + start)
    pieces.append(np.array([size - 1], dtype=np.int64))
    return np.concatenate(pieces)


def check_far_targets(far_targets) -> np.ndarray:
    targets = to_numpy(far_targets, "far_targets").astype(np.float64, copy=False)
    targets = np.atleast_1d(targets)
    if targets.ndim != 1 or targets.size == 0:
        raise ValueError("far_targets must be a non-empty scalar or 1-D sequence")
    if not (np.isfinite(targets).all() and ((targets >= 0) & (targets <= 1)).all()):
        raise ValueError(f"far_targets must lie in [0, 1], got {targets}")
    return targets


def _tar_nearest(counts: _RocCounts, targets: np.ndarray) -> np.ndarray:
    kept = _corner_indices(counts)
    far = _rates(counts.fps[kept], counts.n_impostor)
    tar = _rates(counts.tps[kept], counts.n_genuine)
    result = np.empty(targets.shape[0])
    for position, target in enumerate(targets):
        distance = np.abs(far - target)
        # The last point at the smallest distance: ties go to the larger FAR (then larger TAR).
        result[position] = tar[distance.shape[0] - 1 - np.argmin(distance[::-1])]
    return result


def _tar_threshold(counts: _RocCounts, targets: np.ndarray) -> np.ndarray:
    n_impostor = counts.n_impostor
    allowed = np.floor(targets * n_impostor).astype(np.int64)
    # The (k+1)-th highest impostor score is the first threshold with at least k + 1 impostors
    # at or above it; when k >= n_impostor every pair is accepted.
    run = np.searchsorted(counts.fps, allowed + 1, side="left")
    genuine_sorted = counts.genuine_sorted.astype(np.float64)
    result = np.ones(targets.shape[0])
    inside = allowed < n_impostor
    cut = counts.thresholds[run[inside]]
    above = genuine_sorted.shape[0] - np.searchsorted(genuine_sorted, cut, side="right")
    result[inside] = above / genuine_sorted.shape[0]
    return result


def tar_at_far(scores, labels, far_targets=DEFAULT_FAR_TARGETS, rule: str = "nearest"):
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
    return _tar_nearest(_roc_counts(score_array, label_array), targets)


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

    def as_dict(self) -> dict:
        """A JSON-ready summary (the curve itself left out)."""
        return {
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


def verification_report(
    scores, labels, far_targets=DEFAULT_FAR_TARGETS, *, with_curve: bool = True
) -> VerificationReport:
    """ROC, AUC, EER and TAR@FAR (both rules) from one sort of the scores.

    Each quantity is defined as in :func:`roc`, :func:`auc`, :func:`eer` and :func:`tar_at_far`.
    ``with_curve=False`` leaves the curve arrays empty, saving three float64 arrays the size of
    the number of distinct scores.
    """
    targets = check_far_targets(far_targets)
    counts = _roc_counts(*check_pair_scores(scores, labels))
    if with_curve:
        far, tar, thresholds = _roc_from_counts(counts)
    else:
        far = tar = thresholds = np.empty(0)
    return VerificationReport(
        far=far,
        tar=tar,
        thresholds=thresholds,
        auc=_auc_from_counts(counts),
        eer=_eer_from_counts(counts),
        far_targets=targets,
        tar_at_far_nearest=_tar_nearest(counts, targets),
        tar_at_far_threshold=_tar_threshold(counts, targets),
        n_genuine=counts.n_genuine,
        n_impostor=counts.n_impostor,
    )
