"""Straightforward implementations of the evaluation protocols, the references the fast code is tested against.

Each is the protocol of docs/theory.md written out the way the public evaluators run it: a full stable sort
per query for re-ID (§5), a threshold-by-threshold loop over sklearn's unshuffled KFold for the 10-fold
protocol (§6.2). They are deliberately slow and plain; the benchmarks time the second one as the incumbent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ReferenceReID:
    cmc: np.ndarray | None
    mAP: float | None
    mINP: float | None
    average_precision: np.ndarray  # per query, NaN where skipped
    num_skipped_queries: int


def reference_reid(
    distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50
) -> ReferenceReID:
    """CMC, mAP and mINP: a stable argsort of each row, same-pid-same-camera items dropped."""
    distmat = np.asarray(distmat)
    max_rank = min(max_rank, distmat.shape[1])
    cmc, aps, inps, skipped = [], [], [], 0
    per_query_ap = np.full(len(q_pids), np.nan)
    for i in range(len(q_pids)):
        order = np.argsort(distmat[i], kind="stable")
        junk = (g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i])
        matches = (g_pids[order] == q_pids[i])[~junk]
        if not matches.any():
            skipped += 1
            continue
        ranks = np.flatnonzero(matches) + 1
        ap = np.mean(np.arange(1, len(ranks) + 1) / ranks)
        per_query_ap[i] = ap
        aps.append(ap)
        inps.append(len(ranks) / ranks[-1])
        cmc.append(np.arange(1, max_rank + 1) >= ranks[0])
    if not aps:
        return ReferenceReID(None, None, None, per_query_ap, skipped)
    return ReferenceReID(
        np.mean(cmc, axis=0), float(np.mean(aps)), float(np.mean(inps)), per_query_ap, skipped
    )


@dataclass(frozen=True)
class ReferenceTenFold:
    accuracy_mean: float
    accuracy_std: float
    best_thresholds: np.ndarray
    val_mean: float
    val_std: float
    fold_accuracies: np.ndarray
    fold_vals: np.ndarray  # NaN for a test fold without genuine pairs
    val_thresholds: np.ndarray
    fold_fars: np.ndarray  # test-fold FAR at the VAL threshold, NaN without impostors


def reference_ten_fold(
    unit_embeddings, issame, num_folds: int = 10, far_target: float = 1e-3
) -> ReferenceTenFold:
    """The 10-fold protocol on already L2-normalised, interleaved pair embeddings.

    Distances ``‖ê1 − ê2‖²`` in the embeddings' own precision, then
    :func:`reference_ten_fold_on_distances`.
    """
    unit = np.asarray(unit_embeddings)
    distances = np.sum(np.square(unit[0::2] - unit[1::2]), 1)
    return reference_ten_fold_on_distances(distances, issame, num_folds, far_target)


def reference_ten_fold_on_distances(
    distances, issame, num_folds: int = 10, far_target: float = 1e-3
) -> ReferenceTenFold:
    """The 10-fold protocol, threshold by threshold, over sklearn's unshuffled KFold.

    Accuracy: thresholds ``arange(0, 4, 0.01)``, "same" when ``d < t``, the first best training
    threshold per fold. VAL@FAR: grid ``arange(0, 4, 0.001)``, linear interpolation between the last
    grid point with training FAR <= target and the next one; threshold 0 when FAR never reaches it.
    """
    from sklearn.model_selection import KFold

    dist = np.asarray(distances)
    issame = np.asarray(issame, dtype=bool)
    thresholds, val_grid = np.arange(0, 4, 0.01), np.arange(0, 4, 0.001)
    accuracies, bests, vals, val_thresholds, fold_fars = [], [], [], [], []
    for train, test in KFold(n_splits=num_folds, shuffle=False).split(np.arange(dist.size)):
        train_accuracy = [
            np.sum(np.less(dist[train], t) == issame[train]) / train.size for t in thresholds
        ]
        best = thresholds[int(np.argmax(train_accuracy))]
        bests.append(best)
        accuracies.append(np.sum(np.less(dist[test], best) == issame[test]) / test.size)
        impostors = ~issame[train]
        fars = np.array(
            [np.sum(np.less(dist[train], t) & impostors) / impostors.sum() for t in val_grid]
        )
        if fars.max() >= far_target:
            last = np.flatnonzero(fars <= far_target)[-1]
            if fars[last] == far_target or last == val_grid.size - 1:
                threshold = val_grid[last]
            else:
                slope = (val_grid[last + 1] - val_grid[last]) / (fars[last + 1] - fars[last])
                threshold = val_grid[last] + (far_target - fars[last]) * slope
        else:
            threshold = 0.0
        val_thresholds.append(threshold)
        genuine_in_test = issame[test].sum()
        accepted = np.sum(np.less(dist[test], threshold) & issame[test])
        vals.append(accepted / genuine_in_test if genuine_in_test else np.nan)
        impostors_in_test = (~issame[test]).sum()
        false_accepted = np.sum(np.less(dist[test], threshold) & ~issame[test])
        fold_fars.append(false_accepted / impostors_in_test if impostors_in_test else np.nan)
    return ReferenceTenFold(
        float(np.mean(accuracies)),
        float(np.std(accuracies)),
        np.array(bests),
        float(np.mean(vals)),
        float(np.std(vals)),
        np.array(accuracies),
        np.array(vals),
        np.array(val_thresholds),
        np.array(fold_fars),
    )
