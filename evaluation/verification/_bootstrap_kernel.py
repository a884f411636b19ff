"""Compiled steps of the verification bootstrap: per-run counts and the metrics of one resample.

Every buffer is allocated once by the caller and reused by each resample: on millions of pairs,
first touches of fresh numpy temporaries (backed by transparent huge pages) cost more than the
arithmetic (see :mod:`evaluation.verification._roc_kernel`).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def count_subject_draws(uniforms, subject_counts, subjects_of_items, runs_of_items, counts):
    """Per run (or block), the summed multiplicities of its items, each item counting as often
    as its subject was drawn (subject ``floor(u·S)`` per uniform ``u``)."""
    subject_counts[:] = 0
    num_subjects = subject_counts.shape[0]
    for u in uniforms:
        subject_counts[min(int(u * num_subjects), num_subjects - 1)] += 1
    counts[:] = 0
    for item in range(runs_of_items.shape[0]):
        counts[runs_of_items[item]] += subject_counts[subjects_of_items[item]]


@njit(cache=True, nogil=True)
def resample_metrics(genuine, impostor, far_targets, band_far, true_accepts, false_accepts, out):
    """Metrics of the multiset with per-run multiplicities ``genuine`` / ``impostor`` (runs in
    descending score): ``out = [AUC, EER, TAR@FAR (threshold rule)..., band...]``.

    ``true_accepts`` / ``false_accepts`` (buffers of the number of runs) receive the cumulative
    counts of the runs present. Returns False, leaving ``out`` as is, when a class is empty.
    """
    num_genuine = genuine.sum()
    num_impostor = impostor.sum()
    if num_genuine == 0 or num_impostor == 0:
        return False
    # Cumulative counts over the runs that hold any pair: the ROC points after (0, 0).
    num_points = 0
    tp, fp = 0, 0
    doubled_wins = 0
    for run in range(genuine.shape[0]):
        if genuine[run] + impostor[run] == 0:
            continue
        tp += genuine[run]
        fp += impostor[run]
        # Impostors strictly below this run, and ties counting one half (Mann-Whitney).
        doubled_wins += genuine[run] * (2 * (num_impostor - fp) + impostor[run])
        true_accepts[num_points] = tp
        false_accepts[num_points] = fp
        num_points += 1
    out[0] = doubled_wins / (2.0 * num_genuine * num_impostor)
    out[1] = _eer(true_accepts, false_accepts, num_points, num_genuine, num_impostor)
    num_targets = far_targets.shape[0]
    for position in range(num_targets):
        out[2 + position] = _tar_threshold(
            true_accepts,
            false_accepts,
            num_points,
            num_genuine,
            num_impostor,
            far_targets[position],
        )
    for position in range(band_far.shape[0]):
        out[2 + num_targets + position] = _tar_threshold(
            true_accepts, false_accepts, num_points, num_genuine, num_impostor, band_far[position]
        )
    return True


@njit(cache=True, inline="always")
def _rates(true_accepts, false_accepts, point, num_genuine, num_impostor):
    """(FAR, TAR) of point ``point`` of the curve whose point 0 is (0, 0)."""
    if point == 0:
        return 0.0, 0.0
    return (
        false_accepts[point - 1] / np.float64(num_impostor),
        true_accepts[point - 1] / np.float64(num_genuine),
    )


@njit(cache=True)
def _eer(true_accepts, false_accepts, num_points, num_genuine, num_impostor):
    # FAR − (1 − TAR) never decreases along the curve: the first point where it is >= 0 and the
    # one before it bound the crossing, interpolated linearly (as pair_metrics does).
    previous_far, previous_gap = 0.0, -1.0
    for point in range(1, num_points + 1):
        far, tar = _rates(true_accepts, false_accepts, point, num_genuine, num_impostor)
        gap = far - (1.0 - tar)
        if gap >= 0:
            if gap == 0:
                return far
            return previous_far + (-previous_gap / (gap - previous_gap)) * (far - previous_far)
        previous_far, previous_gap = far, gap
    return previous_far


@njit(cache=True)
def _tar_threshold(true_accepts, false_accepts, num_points, num_genuine, num_impostor, target):
    # The run holding the (k+1)-th highest impostor sets the threshold (k = floor(FAR · I));
    # the genuine pairs strictly above it are those of the earlier runs.
    allowed = np.int64(np.floor(target * num_impostor))
    if allowed >= num_impostor:
        return 1.0
    low, high = 0, num_points - 1
    while low < high:
        middle = (low + high) // 2
        if false_accepts[middle] >= allowed + 1:
            high = middle
        else:
            low = middle + 1
    return (true_accepts[low - 1] if low > 0 else 0) / np.float64(num_genuine)
