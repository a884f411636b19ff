"""IJB-style templates: image features pooled per media, media summed per template.

docs/theory.md §6: image feature = raw + flipped (optionally times a detector score); the frames of
one media (one video, or one still) are averaged; the template is the L2-normalised sum of its
media features. Template-pair scores are cosine similarities of template features.
"""

from __future__ import annotations

import numpy as np

from ..knn import l2_normalize
from ..validation import ArrayLike, check_features, check_ids, check_scores

# Above this many unique-template score entries, pair scores go block by block instead.
MAX_MATRIX_ENTRIES = 1 << 26


def image_features(
    raw: ArrayLike,
    raw_flipped: ArrayLike | None = None,
    detector_scores: ArrayLike | None = None,
    *,
    normalize_images: bool = False,
) -> np.ndarray:
    """Per-image features before pooling: ``raw (+ raw_flipped)``, optionally L2-normalised
    (insightface's ``use_norm_score=False``), then optionally scaled by the detector score."""
    features = check_features(raw, "raw")
    if raw_flipped is not None:
        flipped = check_features(raw_flipped, "raw_flipped")
        if flipped.shape != features.shape:
            raise ValueError(f"raw {features.shape} and raw_flipped {flipped.shape} differ")
        features = features + flipped
    if normalize_images:
        features = l2_normalize(features)
    if detector_scores is not None:
        weights = check_scores(detector_scores, "detector_scores")
        if weights.shape[0] != features.shape[0]:
            raise ValueError(
                f"detector_scores has {weights.shape[0]} entries, expected {features.shape[0]}"
            )
        features = features * weights[:, None].astype(features.dtype, copy=False)
    return features


def template_features(
    features: ArrayLike, template_ids: ArrayLike, media_ids: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """``(template_features, unique_template_ids)``: per template (sorted ids), the normalised
    sum over its media of the mean image feature of each media (media grouped within template).
    Accumulates in float64."""
    feature_array = check_features(features, "features")
    num_images = feature_array.shape[0]
    templates = check_ids(template_ids, "template_ids", length=num_images)
    medias = check_ids(media_ids, "media_ids", length=num_images)
    order = np.lexsort((medias, templates))
    sorted_templates, sorted_medias = templates[order], medias[order]
    new_group = np.ones(num_images, dtype=bool)
    new_group[1:] = (sorted_templates[1:] != sorted_templates[:-1]) | (
        sorted_medias[1:] != sorted_medias[:-1]
    )
    group_starts = np.flatnonzero(new_group)
    group_sizes = np.diff(np.append(group_starts, num_images))
    media_sums = np.add.reduceat(feature_array[order].astype(np.float64), group_starts, axis=0)
    media_means = media_sums / group_sizes[:, None]
    group_templates = sorted_templates[group_starts]
    unique_templates, template_starts = np.unique(group_templates, return_index=True)
    pooled = np.add.reduceat(media_means, template_starts, axis=0)
    return l2_normalize(pooled), unique_templates


def template_rows(unique_template_ids: np.ndarray, wanted: ArrayLike, name: str) -> np.ndarray:
    """Rows of ``wanted`` template ids within the sorted ``unique_template_ids``."""
    wanted_ids = check_ids(wanted, name)
    rows = np.searchsorted(unique_template_ids, wanted_ids)
    rows = np.minimum(rows, unique_template_ids.shape[0] - 1)
    missing = unique_template_ids[rows] != wanted_ids
    if missing.any():
        raise ValueError(f"{name} names templates without images, e.g. {wanted_ids[missing][:5]}")
    return rows


def template_pair_scores(
    template_feats: ArrayLike,
    unique_template_ids: ArrayLike,
    template_1: ArrayLike,
    template_2: ArrayLike,
    *,
    block_size: int = 1 << 18,
) -> np.ndarray:
    """Cosine score of each template pair ``(template_1[i], template_2[i])`` (float32).

    When the templates met in the pairs are few enough, one matrix product over the unique
    templates gives every score and the pairs gather from it; otherwise the pairs go in blocks,
    each through a matrix product over the block's unique templates when that is smaller than
    a row-wise dot product, else row-wise.
    """
    feats = np.ascontiguousarray(check_features(template_feats, "template_feats"), np.float32)
    ids = check_ids(unique_template_ids, "unique_template_ids", length=feats.shape[0])
    if ids.size > 1 and not (np.diff(ids) > 0).all():
        raise ValueError("unique_template_ids must be sorted and unique")
    rows_1 = template_rows(ids, template_1, "template_1")
    rows_2 = template_rows(ids, template_2, "template_2")
    if rows_1.shape != rows_2.shape:
        raise ValueError(f"template_1 has {rows_1.shape[0]} pairs, template_2 {rows_2.shape[0]}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    scores = np.empty(rows_1.shape[0], dtype=np.float32)
    for start in range(0, rows_1.shape[0], block_size):
        block = slice(start, start + block_size)
        scores[block] = _block_scores(feats, rows_1[block], rows_2[block])
    return scores


def _block_scores(feats: np.ndarray, rows_1: np.ndarray, rows_2: np.ndarray) -> np.ndarray:
    unique_1, inverse_1 = np.unique(rows_1, return_inverse=True)
    unique_2, inverse_2 = np.unique(rows_2, return_inverse=True)
    if unique_1.size * unique_2.size <= min(MAX_MATRIX_ENTRIES, 4 * rows_1.size):
        return (feats[unique_1] @ feats[unique_2].T)[inverse_1, inverse_2]
    return np.einsum("ij,ij->i", feats[rows_1], feats[rows_2])
