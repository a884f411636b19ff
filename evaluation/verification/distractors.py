"""Open-set identification with distractors, MegaFace-style (docs/theory.md §11).

Each probe is searched (cosine similarity) in a gallery that holds its mates, grown with the
first ``n`` embeddings of a distractor set (people who are in neither the probe nor the
gallery set), for ``n`` = 10, 100, ..., up to the whole set. The kept rank of a probe is
``1 +`` the number of non-mate gallery items and of the first ``n`` distractors that score at
least its best mate (ties count against the probe), and the rank-k identification rate is the
share of mated probes (those with a mate in the gallery) whose rank is at most ``k``.

A probe's rank only needs its best mate score, its count of non-mates at or above it, and its
count of distractors at or above it among the first ``n``. The distractors are read once, in
order, block by block: the block's probe x distractor products (cosine, float32, torch on
``device``) are compared with each probe's best mate score by a compiled counting pass (torch's
own comparison on a GPU) and the counts added up; blocks end
at every requested count, so every count is read off the same pass, at the cost of the
products alone. Memory beyond the inputs is one block of distractors (as float32, normalised)
and its (probes, block rows) scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..defaults import DEFAULT_RANKS
from ..knn import l2_normalize, search_device
from ..validation import (
    ArrayLike,
    DeviceLike,
    check_features,
    check_ids,
    check_positive_integer,
    check_ranks,
    to_numpy,
)

DEFAULT_BLOCK_ROWS = 2**14


@dataclass(frozen=True)
class DistractorCurve:
    """Rank-k identification rate (``rates[i, j]``: ``distractor_counts[i]`` distractors,
    rank ``ranks[j]``), over ``num_mated`` mated probes; count 0 is the gallery alone."""

    distractor_counts: np.ndarray
    ranks: tuple[int, ...]
    rates: np.ndarray
    num_mated: int
    num_non_mated: int

    def as_dict(self) -> dict:
        return {
            "num_mated": self.num_mated,
            "num_non_mated": self.num_non_mated,
            "ranks": list(self.ranks),
            "curve": [
                {
                    "distractors": int(count),
                    **{f"rank{k}": float(r) for k, r in zip(self.ranks, row, strict=True)},
                }
                for count, row in zip(self.distractor_counts, self.rates, strict=True)
            ],
        }


def default_distractor_counts(num_distractors: int) -> np.ndarray:
    """0, 10, 100, ... (powers of ten below the set's size), then the whole set."""
    powers = [10**e for e in range(1, 19) if 10**e < num_distractors]
    return np.array([0, *powers, num_distractors], dtype=np.int64)


def identification_with_distractors(
    probe_features: ArrayLike,
    probe_subjects: ArrayLike,
    gallery_features: ArrayLike,
    gallery_subjects: ArrayLike,
    distractor_features: ArrayLike,
    distractor_counts: ArrayLike | None = None,
    ranks: Sequence[int] = DEFAULT_RANKS,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    device: DeviceLike = None,
    *,
    use_gpu: bool | None = None,
) -> DistractorCurve:
    """Rank-k identification rates as the gallery grows with distractors (module docstring).

    ``distractor_features`` (num_distractors, d) may be a memory-mapped array: it is read
    ``block_rows`` rows at a time and never copied whole. ``distractor_counts``: non-decreasing
    counts in [0, num_distractors] (default :func:`default_distractor_counts`). The products
    run with torch on ``device`` (default CUDA when available; the deprecated ``use_gpu=``
    picks ``"cuda"`` or ``"cpu"``).

    Raises:
        ValueError: bad features or ids, mismatched dimensions, no mated probe, ranks or counts
            out of range, a zero or non-finite feature vector.
    """
    device = search_device(device, use_gpu)
    probes = l2_normalize(check_features(probe_features, "probe_features").astype(np.float32))
    gallery = l2_normalize(check_features(gallery_features, "gallery_features").astype(np.float32))
    probe_ids = check_ids(probe_subjects, "probe_subjects", len(probes))
    gallery_ids = check_ids(gallery_subjects, "gallery_subjects", len(gallery))
    distractors = to_numpy(distractor_features, "distractor_features")
    if distractors.ndim != 2 or not np.issubdtype(distractors.dtype, np.floating):
        raise ValueError(
            f"distractor_features must be a 2-D float array, got {distractors.shape} "
            f"{distractors.dtype}"
        )
    for name, features in (("gallery_features", gallery), ("distractor_features", distractors)):
        if features.shape[1] != probes.shape[1]:
            raise ValueError(
                f"probe_features have dimension {probes.shape[1]} but {name} have "
                f"{features.shape[1]}"
            )
    rank_list = check_ranks(ranks)
    block_rows = check_positive_integer(block_rows, "block_rows")
    counts = _check_counts(distractor_counts, len(distractors))

    best_mate, non_mates_ahead = _gallery_ranks(probes, probe_ids, gallery, gallery_ids)
    mated = np.isfinite(best_mate)
    if not mated.any():
        raise ValueError("no probe subject appears in gallery_subjects: every rate is undefined")
    best_mate, non_mates_ahead, probes = best_mate[mated], non_mates_ahead[mated], probes[mated]

    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    probes_t = torch.from_numpy(probes).to(device)
    best_mate_t = torch.from_numpy(best_mate).to(device)[:, None]
    # Per probe, the distractors read so far that score at least its best mate.
    ahead = np.zeros(len(probes), dtype=np.int64)
    rates = np.empty((len(counts), len(rank_list)))
    start = 0
    for position, count in enumerate(counts.tolist()):
        while start < count:
            stop = min(count, start + block_rows)
            block = check_features(distractors[start:stop], "distractor_features")
            block_t = torch.from_numpy(l2_normalize(block.astype(np.float32, copy=False)))
            scores = probes_t @ block_t.to(device).T
            if scores.device.type == "cpu":
                _count_at_least(scores.numpy(), best_mate, ahead)
            else:
                ahead += torch.count_nonzero(scores >= best_mate_t, dim=1).cpu().numpy()
            del scores  # freed before the next block's scores are made
            start = stop
        ranks_now = 1 + non_mates_ahead + ahead
        rates[position] = [np.count_nonzero(ranks_now <= k) / len(probes) for k in rank_list]
    return DistractorCurve(counts, rank_list, rates, int(mated.sum()), int((~mated).sum()))


@njit(cache=True, parallel=True)
def _count_at_least(scores, thresholds, counts):
    """``counts[r] +=`` the entries of row ``r`` of ``scores`` at least ``thresholds[r]``.

    One compiled read of the scores: torch's comparison and sum over a (probes, block) matrix
    write a boolean and a widened temporary of the same shape and took ~30x longer here.
    """
    for row in prange(scores.shape[0]):
        threshold = thresholds[row]
        total = 0
        for column in range(scores.shape[1]):
            if scores[row, column] >= threshold:
                total += 1
        counts[row] += total


def _check_counts(distractor_counts, num_distractors: int) -> np.ndarray:
    if distractor_counts is None:
        return default_distractor_counts(num_distractors)
    counts = to_numpy(distractor_counts, "distractor_counts")
    if counts.ndim != 1 or counts.size == 0 or not np.issubdtype(counts.dtype, np.integer):
        raise ValueError("distractor_counts must be a non-empty 1-D sequence of integers")
    if counts.min() < 0 or counts.max() > num_distractors or (np.diff(counts) < 0).any():
        raise ValueError(
            f"distractor_counts must be non-decreasing counts in [0, {num_distractors}], "
            f"got {counts.tolist()}"
        )
    return counts.astype(np.int64)


def _gallery_ranks(probes, probe_ids, gallery, gallery_ids, block_rows: int = 1024):
    """Per probe: its best mate score (-inf without a mate) and the non-mates at or above it."""
    best_mate = np.empty(len(probes), dtype=np.float32)
    ahead = np.empty(len(probes), dtype=np.int64)
    for first in range(0, len(probes), block_rows):
        rows = slice(first, first + block_rows)
        scores = probes[rows] @ gallery.T
        is_mate = probe_ids[rows, None] == gallery_ids[None, :]
        best = np.where(is_mate, scores, -np.inf).max(axis=1)
        best_mate[rows] = best
        ahead[rows] = ((scores >= best[:, None]) & ~is_mate).sum(axis=1)
    return best_mate, ahead
