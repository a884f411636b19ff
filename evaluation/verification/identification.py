"""Open-set 1:N identification: probe templates searched against gallery templates.

A probe is *mated* when its subject has a template in the gallery, *non-mated* otherwise.
At a threshold ``t`` (a candidate passes when its score is strictly above ``t``):
FPIR = share of non-mated probes whose top-1 score passes; TPIR = share of mated probes whose
top-1 gallery template is a mate and passes. The threshold for a target FPIR follows the
"threshold" rule of TAR@FAR: ``t`` is the (k+1)-th highest non-mated top-1 score with
``k = floor(FPIR * num_non_mated)``. Rank-k identification rate: share of mated probes with a
mate among their k best gallery templates (closed-set CMC over the mated probes). Without
non-mated probes (closed-set search) FPIR is undefined and TPIR and the thresholds are NaN;
without mated probes nothing is defined and a ``ValueError`` is raised.

Ties: gallery templates of equal score are ranked in gallery order (lower index first), so the
rank-k rates do not depend on the ``ranks`` asked for (FAISS alone orders equal scores its own
way, and which of a tie group it keeps depends on the k searched).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .._deprecation import DeprecatedAlias, RenamedKeysDict, renamed_keys
from ..defaults import DEFAULT_FPIR_TARGETS, DEFAULT_RANKS
from ..knn import search_device, top_k
from ..validation import ArrayLike, DeviceLike, check_features, check_ids, check_ranks, to_numpy
from .pair_metrics import check_far_targets

_RENAMED_KEYS = renamed_keys(
    "IdentificationResult", n_mated="num_mated", n_non_mated="num_non_mated"
)


@dataclass(frozen=True)
class IdentificationResult:
    ranks: tuple[int, ...]
    rank_rates: np.ndarray
    fpir_targets: np.ndarray
    tpir: np.ndarray
    thresholds: np.ndarray
    num_mated: int
    num_non_mated: int
    n_mated = DeprecatedAlias("num_mated")
    n_non_mated = DeprecatedAlias("num_non_mated")

    def as_dict(self) -> dict:
        summary = {
            "num_mated": self.num_mated,
            "num_non_mated": self.num_non_mated,
            "rank": {
                str(k): float(rate) for k, rate in zip(self.ranks, self.rank_rates, strict=True)
            },
            "tpir_at_fpir": [
                {"fpir": float(f), "tpir": float(t), "threshold": float(s)}
                for f, t, s in zip(self.fpir_targets, self.tpir, self.thresholds, strict=True)
            ],
        }
        return RenamedKeysDict(summary, _RENAMED_KEYS)


def identification_from_top_k(
    top_scores: ArrayLike,
    top_subjects: ArrayLike,
    probe_subjects: ArrayLike,
    gallery_subjects: ArrayLike,
    ranks: Sequence[int] = DEFAULT_RANKS,
    fpir_targets: ArrayLike | float = DEFAULT_FPIR_TARGETS,
) -> IdentificationResult:
    """Metrics from each probe's best gallery candidates, best first: ``top_scores`` and
    ``top_subjects`` of shape (num_probes, k); ``gallery_subjects`` lists every gallery subject
    (it decides which probes are mated)."""
    scores = to_numpy(top_scores, "top_scores").astype(np.float64, copy=False)
    subjects = to_numpy(top_subjects, "top_subjects")
    probes = check_ids(probe_subjects, "probe_subjects")
    gallery = check_ids(gallery_subjects, "gallery_subjects")
    if scores.ndim != 2 or scores.shape != subjects.shape or scores.shape[0] != probes.shape[0]:
        raise ValueError(
            f"top_scores {scores.shape} and top_subjects {subjects.shape} must both be "
            f"(num_probes={probes.shape[0]}, k)"
        )
    if not np.isfinite(scores).all():
        raise ValueError("top_scores contains NaN or Inf")
    rank_list = check_ranks(ranks)
    if any(k > scores.shape[1] for k in rank_list):
        raise ValueError(f"ranks must lie in [1, {scores.shape[1]}] (the k searched), got {ranks}")
    targets = check_far_targets(fpir_targets)
    mated = np.isin(probes, gallery)
    num_mated, num_non_mated = int(mated.sum()), int((~mated).sum())
    if num_mated == 0:
        raise ValueError("no probe subject appears in gallery_subjects: every metric is undefined")
    hits = subjects == probes[:, None]
    first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1), scores.shape[1])
    rank_rates = np.array([np.count_nonzero(first_hit[mated] < k) / num_mated for k in rank_list])

    tpir = np.full(targets.shape[0], np.nan)
    thresholds = np.full(targets.shape[0], np.nan)
    if num_non_mated:
        non_mated_top = np.sort(scores[~mated, 0])[::-1]
        allowed = np.floor(targets * num_non_mated).astype(np.int64)
        thresholds = np.where(
            allowed < num_non_mated, non_mated_top[np.minimum(allowed, num_non_mated - 1)], -np.inf
        )
        mate_first = mated & (first_hit == 0)
        top_mated = scores[mate_first, 0]
        tpir = np.array([np.count_nonzero(top_mated > t) / num_mated for t in thresholds])
    return IdentificationResult(
        rank_list, rank_rates, targets, tpir, thresholds, num_mated, num_non_mated
    )


def _top_k_ties_in_gallery_order(probes, gallery, k: int, device: DeviceLike):
    """FAISS's cosine top-k with equal scores ordered by gallery index, independent of ``k``.

    One more candidate than needed is searched; a probe whose k-th and (k+1)-th scores tie has a
    tie group cut by k, and only those probes are searched again over the whole gallery.
    """
    search = min(k + 1, gallery.shape[0])
    scores, indices = top_k(probes, gallery, search, metric="cosine", device=device)
    if search > k:
        cut = np.flatnonzero(scores[:, k - 1] == scores[:, k])
        if cut.size:
            all_scores, all_indices = top_k(
                probes[cut], gallery, gallery.shape[0], metric="cosine", device=device
            )
            scores, indices = scores[:, :k].copy(), indices[:, :k].copy()
            order = np.lexsort((all_indices, -all_scores))[:, :k]
            scores[cut] = np.take_along_axis(all_scores, order, axis=1)
            indices[cut] = np.take_along_axis(all_indices, order, axis=1)
    scores, indices = scores[:, :k], indices[:, :k]
    order = np.lexsort((indices, -scores))
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(indices, order, axis=1)


def open_set_identification(
    probe_features: ArrayLike,
    probe_subjects: ArrayLike,
    gallery_features: ArrayLike,
    gallery_subjects: ArrayLike,
    ranks: Sequence[int] = DEFAULT_RANKS,
    fpir_targets: ArrayLike | float = DEFAULT_FPIR_TARGETS,
    device: DeviceLike = None,
    *,
    use_gpu: bool | None = None,
) -> IdentificationResult:
    """Search each probe template among the gallery templates (cosine, exact FAISS top-k with
    ``k = max(ranks)``, on ``device`` as :func:`evaluation.knn.search_device` reads it;
    ``use_gpu=`` is deprecated) and report rank-k rates and TPIR@FPIR (module docstring).

    Raises:
        ValueError: bad features or ids, no rank or a rank above the gallery size, no mated
            probe, FPIR targets out of range.
    """
    device = search_device(device, use_gpu)
    probes = check_features(probe_features, "probe_features")
    gallery = check_features(gallery_features, "gallery_features")
    probe_ids = check_ids(probe_subjects, "probe_subjects", length=probes.shape[0])
    gallery_ids = check_ids(gallery_subjects, "gallery_subjects", length=gallery.shape[0])
    k = max(check_ranks(ranks))
    if k > gallery.shape[0]:
        raise ValueError(f"ranks ask for {k} candidates but the gallery has {gallery.shape[0]}")
    scores, indices = _top_k_ties_in_gallery_order(probes, gallery, k, device)
    return identification_from_top_k(
        scores, gallery_ids[indices], probe_ids, gallery_ids, ranks, fpir_targets
    )
