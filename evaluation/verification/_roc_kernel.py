"""The ROC in one compiled pass over the sorted scores (numba, cached on disk after first use).

Walking the ascending scores from the top, each run of equal scores is one ROC point; the genuine
scores among the run come from a second pointer into the sorted genuine scores. Writing the
thresholds and both rates straight into their final arrays keeps the fresh memory to the
outputs, which on tens of millions of pairs is what the time goes to.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _walk(sorted_scores, genuine_sorted, num_genuine, num_impostor, thresholds, far, tar, corners):
    """One pass from the highest score. With ``thresholds`` of size 0 it only counts: returns
    ``(num_points, num_corners)``. Otherwise it fills point ``p`` (from 0) at index ``p + 1`` of the
    output arrays and the indices of the points ``roc_curve(drop_intermediate=True)`` keeps
    (first, last, and those whose next run differs in genuine or impostor count) into
    ``corners``."""
    fill = thresholds.shape[0] > 0
    position = sorted_scores.shape[0] - 1
    genuine_position = genuine_sorted.shape[0] - 1
    true_accepts = 0
    false_accepts = 0
    point = 0
    num_corners = 0
    previous_genuine = -1
    previous_impostor = -1
    while position >= 0:
        value = sorted_scores[position]
        run_end = position
        while position >= 0 and sorted_scores[position] == value:
            position -= 1
        run_genuine = 0
        while genuine_position >= 0 and genuine_sorted[genuine_position] == value:
            run_genuine += 1
            genuine_position -= 1
        run_impostor = run_end - position - run_genuine
        # The previous point is a corner when this run's make-up differs from its own.
        if point == 1 or (
            point > 1 and (run_genuine != previous_genuine or run_impostor != previous_impostor)
        ):
            if fill:
                corners[num_corners] = point - 1
            num_corners += 1
        true_accepts += run_genuine
        false_accepts += run_impostor
        if fill:
            thresholds[point + 1] = np.float64(value)
            far[point + 1] = np.float64(false_accepts) / np.float64(num_impostor)
            tar[point + 1] = np.float64(true_accepts) / np.float64(num_genuine)
        previous_genuine = run_genuine
        previous_impostor = run_impostor
        point += 1
    if point > 1:
        if fill:
            corners[num_corners] = point - 1
        num_corners += 1
    elif fill:
        corners[0] = 0
    return point, max(num_corners, 1)


@njit(cache=True, nogil=True)
def roc_arrays(sorted_scores, genuine_sorted, num_genuine, num_impostor):
    """``(thresholds, far, tar, corners)`` with ``[+inf, 0, 0]`` at index 0 of the curve.

    The outputs are allocated here, by numba's allocator, rather than by numpy: numpy advises the
    kernel to back large arrays with transparent huge pages, and where huge pages are compacted on
    demand, touching hundreds of MB of them for the first time was measured 2 to 5 times slower.
    """
    no_floats = np.empty(0)
    num_points, num_corners = _walk(
        sorted_scores,
        genuine_sorted,
        num_genuine,
        num_impostor,
        no_floats,
        no_floats,
        no_floats,
        np.empty(0, dtype=np.int64),
    )
    thresholds = np.empty(num_points + 1)
    far = np.empty(num_points + 1)
    tar = np.empty(num_points + 1)
    corners = np.empty(num_corners, dtype=np.int64)
    thresholds[0], far[0], tar[0] = np.inf, 0.0, 0.0
    _walk(sorted_scores, genuine_sorted, num_genuine, num_impostor, thresholds, far, tar, corners)
    return thresholds, far, tar, corners


@njit(cache=True, nogil=True)
def fresh_copy(array):
    """A copy of a 1-D array in memory from numba's allocator (see :func:`roc_arrays`)."""
    copy = np.empty(array.shape[0], dtype=array.dtype)
    copy[:] = array
    return copy
