"""The 10-fold verification accuracy of LFW, CFP-FP, AgeDB-30, CALFW and CPLFW.

Reproduces the numbers of insightface's evaluator (docs/theory.md §6) without its per-threshold
Python loops: each fold's genuine and impostor distances are sorted once, and one
``searchsorted`` of the whole threshold grid gives, for every threshold at once, how many pairs
of the fold fall below it. Training-set counts are the totals minus the fold's own.

Everything is computed in float64, as the reference does (it copies the network's float32
outputs into a float64 array before normalising): in float32 about 1 pair in 100,000 lands on
the other side of a 0.01 threshold step, enough to move an accuracy on a small set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._deprecation import renamed_keywords
from ..defaults import DEFAULT_NUM_FOLDS
from ..validation import ArrayLike, check_binary_labels, check_features, check_scores

ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
VAL_FAR_TARGET = 1e-3
_PAIRS_PER_BLOCK = 256


def normalize_rows(features: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm, the norm computed as ``sqrt(einsum("ij,ij->i"))`` in the
    features' precision: bit for bit what ``sklearn.preprocessing.normalize`` (used by the
    reference evaluator) gives.

    Raises:
        ValueError: a row is entirely zero.
    """
    norms = np.sqrt(np.einsum("ij,ij->i", features, features))
    if (norms == 0).any():
        raise ValueError("cannot L2-normalise a zero feature vector")
    return features / norms[:, None]


def _summed(raw, raw_flipped) -> np.ndarray:
    """The features (plus the flipped ones) in float64, as the reference evaluator holds them."""
    raw_array = check_features(raw, "raw").astype(np.float64, copy=False)
    if raw_flipped is None:
        return raw_array
    flipped_array = check_features(raw_flipped, "raw_flipped")
    if raw_array.shape != flipped_array.shape:
        raise ValueError(
            f"raw {raw_array.shape} and raw_flipped {flipped_array.shape} differ in shape"
        )
    return raw_array + flipped_array.astype(np.float64, copy=False)


def fuse_flip(raw: ArrayLike, raw_flipped: ArrayLike) -> np.ndarray:
    """Test-time flip: ``normalize(raw + raw_flipped)``, the features summed before normalising,
    in float64 (see the module docstring)."""
    return normalize_rows(_summed(raw, raw_flipped))


def pair_distances(
    embeddings: ArrayLike, flipped_embeddings: ArrayLike | None = None
) -> np.ndarray:
    """Squared euclidean distances ``‖ê1 − ê2‖²`` of L2-normalised embeddings stored as
    interleaved pairs (rows 0::2 against rows 1::2), in float64 whatever the embeddings' type
    (as the reference evaluator computes them). With ``flipped_embeddings``,
    ``ê = normalize(raw + flipped)`` (see :func:`fuse_flip`)."""
    array = _summed(embeddings, flipped_embeddings)
    if array.shape[0] % 2:
        raise ValueError(
            f"embeddings must hold interleaved pairs (an even number of rows), got {array.shape[0]}"
        )
    num_pairs = array.shape[0] // 2
    distances = np.empty(num_pairs, dtype=array.dtype)
    # Blocks small enough to stay in cache: the same numbers as whole-array operations, without
    # the page faults of several full-size temporaries.
    for start in range(0, num_pairs, _PAIRS_PER_BLOCK):
        rows = slice(2 * start, 2 * min(start + _PAIRS_PER_BLOCK, num_pairs))
        normalized = normalize_rows(array[rows])
        difference = np.subtract(normalized[0::2], normalized[1::2])
        distances[start : start + difference.shape[0]] = np.sum(
            np.square(difference, out=difference), axis=1
        )
    return distances


@dataclass(frozen=True)
class TenFoldResult:
    """Outcome of :func:`verification_accuracy_10fold`; ``*_std`` are population stds."""

    accuracy_mean: float
    accuracy_std: float
    fold_accuracies: np.ndarray
    best_thresholds: np.ndarray
    val_mean: float
    val_std: float
    far_mean: float
    fold_vals: np.ndarray
    fold_fars: np.ndarray
    val_thresholds: np.ndarray

    def as_dict(self) -> dict:
        return {
            "accuracy_mean": self.accuracy_mean,
            "accuracy_std": self.accuracy_std,
            "val_at_far_1e-3_mean": self.val_mean,
            "val_at_far_1e-3_std": self.val_std,
            "far_mean": self.far_mean,
            "best_thresholds": self.best_thresholds.tolist(),
        }


@renamed_keywords(n_items="num_items", n_folds="num_folds")
def fold_bounds(num_items: int, num_folds: int) -> np.ndarray:
    """Contiguous folds as sklearn's ``KFold(shuffle=False)`` cuts them: ``num_folds + 1`` bounds,
    the first ``num_items % num_folds`` folds one item longer."""
    sizes = np.full(num_folds, num_items // num_folds, dtype=np.int64)
    sizes[: num_items % num_folds] += 1
    return np.concatenate([[0], np.cumsum(sizes)])


def _interpolated_threshold(fars: np.ndarray, grid: np.ndarray, target: float) -> float:
    """Threshold where the training FAR reaches ``target``: linear interpolation between the last
    grid point with FAR <= target and the next one; 0 when no grid point reaches the target
    (the reference's fallback), the first grid point when even it exceeds the target."""
    if fars[-1] < target:
        return 0.0
    last = int(np.searchsorted(fars, target, side="right")) - 1
    if last < 0:
        return float(grid[0])
    if last == grid.shape[0] - 1 or fars[last] == target:
        return float(grid[last])
    step = (target - fars[last]) / (fars[last + 1] - fars[last])
    return float(grid[last] + step * (grid[last + 1] - grid[last]))


def _checked_pair_distances(embeddings, flipped_embeddings, scores, distances) -> np.ndarray:
    given = [
        name
        for name, value in (
            ("embeddings", embeddings),
            ("scores", scores),
            ("distances", distances),
        )
        if value is not None
    ]
    if len(given) != 1:
        raise ValueError(
            f"give exactly one of embeddings, scores, distances (got {given or 'none'})"
        )
    if embeddings is not None:
        return pair_distances(embeddings, flipped_embeddings)
    if flipped_embeddings is not None:
        raise ValueError("flipped_embeddings go with embeddings")
    if scores is not None:
        # Cosine similarity of unit vectors: ‖ê1 − ê2‖² = 2 − 2 cos, in float64.
        return 2.0 - 2.0 * check_scores(scores, "scores").astype(np.float64)
    return check_scores(distances, "distances").astype(np.float64)


@renamed_keywords(n_folds="num_folds")
def verification_accuracy_10fold(
    embeddings: ArrayLike | None = None,
    issame: ArrayLike | None = None,
    num_folds: int = DEFAULT_NUM_FOLDS,
    *,
    flipped_embeddings: ArrayLike | None = None,
    scores: ArrayLike | None = None,
    distances: ArrayLike | None = None,
    far_target: float = VAL_FAR_TARGET,
) -> TenFoldResult:
    """insightface's k-fold verification protocol (docs/theory.md §6).

    Pairs come either as ``embeddings`` of shape (2 n, d) interleaved (rows 0::2 against 1::2,
    L2-normalised here; for flip test give the raw features of the flipped images as
    ``flipped_embeddings``: ``normalize(raw + flipped)``, one normalisation as in the reference),
    or as ``scores`` (cosine
    similarities, converted to ``d = 2 − 2 cos``) or ``distances`` (``d = ‖ê1 − ê2‖²``) of the
    n pairs; ``issame`` holds the n pair labels. Pairs in file order are cut into ``num_folds``
    contiguous folds. For each fold, the threshold of ``np.arange(0, 4, 0.01)`` with the best
    accuracy on the other folds (first maximum; "same" when ``d < t``) is applied to the fold.
    VAL@FAR: on the other folds, the threshold of the grid ``np.arange(0, 4, 0.001)`` where the FAR
    reaches ``far_target`` (linear interpolation, see :func:`_interpolated_threshold`), applied
    to the fold. Means and population stds over the folds. VAL (FAR) of a fold without genuine
    (impostor) pairs is NaN, as its rate is undefined; so are VAL, FAR and the VAL threshold of a
    fold whose other folds hold no impostor pair. Everything is computed in float64.

    Raises:
        ValueError: not exactly one of embeddings, scores, distances; bad or mismatched inputs;
            fewer pairs than folds; ``far_target`` outside (0, 1).
    """
    distance = _checked_pair_distances(embeddings, flipped_embeddings, scores, distances)
    if issame is None:
        raise ValueError("issame (the pair labels) is required")
    same = check_binary_labels(issame, "issame", length=distance.shape[0])
    if not isinstance(num_folds, int | np.integer) or num_folds < 2:
        raise ValueError(f"num_folds must be an integer >= 2, got {num_folds!r}")
    if distance.shape[0] < num_folds:
        raise ValueError(f"{distance.shape[0]} pairs cannot be split into {num_folds} folds")
    if not 0 < far_target < 1:
        raise ValueError(f"far_target must lie in (0, 1), got {far_target}")

    bounds = fold_bounds(distance.shape[0], num_folds)
    folds = [slice(bounds[f], bounds[f + 1]) for f in range(num_folds)]
    genuine_sizes = np.array([np.count_nonzero(same[fold]) for fold in folds])
    fold_sizes = np.diff(bounds)
    impostor_sizes = fold_sizes - genuine_sizes
    # Per fold, genuine and impostor pairs strictly below each threshold of each grid: one sort
    # of each fold's distances, one searchsorted of each grid.
    grids = (ACCURACY_THRESHOLDS, VAL_THRESHOLDS)
    genuine_below = [np.empty((num_folds, grid.shape[0]), dtype=np.int64) for grid in grids]
    impostor_below = [np.empty((num_folds, grid.shape[0]), dtype=np.int64) for grid in grids]
    for f, fold in enumerate(folds):
        genuine_sorted = np.sort(distance[fold][same[fold]])
        impostor_sorted = np.sort(distance[fold][~same[fold]])
        for g, grid in enumerate(grids):
            genuine_below[g][f] = np.searchsorted(genuine_sorted, grid, side="left")
            impostor_below[g][f] = np.searchsorted(impostor_sorted, grid, side="left")

    accuracies = np.empty(num_folds)
    best_thresholds = np.empty(num_folds)
    vals = np.empty(num_folds)
    fars = np.empty(num_folds)
    val_thresholds = np.empty(num_folds)
    for f in range(num_folds):
        train_genuine = genuine_below[0].sum(axis=0) - genuine_below[0][f]
        train_impostor = impostor_below[0].sum(axis=0) - impostor_below[0][f]
        train_impostor_total = impostor_sizes.sum() - impostor_sizes[f]
        correct = train_genuine + (train_impostor_total - train_impostor)
        best = ACCURACY_THRESHOLDS[int(np.argmax(correct))]
        best_thresholds[f] = best
        test = distance[folds[f]]
        test_same = same[folds[f]]
        predicted = test < best
        accuracies[f] = np.count_nonzero(predicted == test_same) / test.shape[0]

        train_far_counts = impostor_below[1].sum(axis=0) - impostor_below[1][f]
        if train_impostor_total == 0:
            # No impostor pair to set a FAR on: VAL@FAR is undefined for this fold.
            val_thresholds[f] = vals[f] = fars[f] = np.nan
            continue
        threshold = _interpolated_threshold(
            train_far_counts / train_impostor_total, VAL_THRESHOLDS, far_target
        )
        val_thresholds[f] = threshold
        accepted = test < threshold
        vals[f] = _rate(np.count_nonzero(accepted & test_same), genuine_sizes[f])
        fars[f] = _rate(np.count_nonzero(accepted & ~test_same), impostor_sizes[f])

    return TenFoldResult(
        accuracy_mean=float(np.mean(accuracies)),
        accuracy_std=float(np.std(accuracies)),
        fold_accuracies=accuracies,
        best_thresholds=best_thresholds,
        val_mean=float(np.mean(vals)),
        val_std=float(np.std(vals)),
        far_mean=float(np.mean(fars)),
        fold_vals=vals,
        fold_fars=fars,
        val_thresholds=val_thresholds,
    )


def _rate(count: int, total: int) -> float:
    return count / total if total else float("nan")
