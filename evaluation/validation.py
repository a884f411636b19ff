"""Input checks shared by the re-ID and verification cores.

Every public metric function validates through these, so that bad input gives one clear
``ValueError`` naming the argument instead of a silent wrong number.
"""

from __future__ import annotations

import numpy as np


def to_numpy(array, name: str) -> np.ndarray:
    """Accept numpy arrays, array-likes and (CPU or GPU) torch tensors."""
    if hasattr(array, "detach") and hasattr(array, "cpu"):
        array = array.detach().cpu().numpy()
    try:
        return np.asarray(array)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} cannot be read as an array: {error}") from error


def check_features(features, name: str, *, allow_empty: bool = False) -> np.ndarray:
    """A finite 2-D floating-point matrix (n, d); float16 is widened to float32."""
    array = to_numpy(features, name)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, dim), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name} must be floating point, got dtype {array.dtype}")
    if array.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty")
    if array.shape[1] == 0:
        raise ValueError(f"{name} has zero feature dimensions")
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return array


def check_scores(scores, name: str = "scores") -> np.ndarray:
    """A finite, non-empty 1-D floating-point vector."""
    array = to_numpy(scores, name)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.issubdtype(array.dtype, np.floating):
        if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
            array = array.astype(np.float64)
        else:
            raise ValueError(f"{name} must be numeric, got dtype {array.dtype}")
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return array


def check_ids(ids, name: str, length: int | None = None) -> np.ndarray:
    """A 1-D integer vector (person ids, camera ids, class labels), optionally of a given length."""
    array = to_numpy(ids, name)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    if length is not None and array.shape[0] != length:
        raise ValueError(f"{name} has {array.shape[0]} entries, expected {length}")
    return array.astype(np.int64, copy=False)


def check_positive_integer(value, name: str) -> int:
    """A Python or numpy integer >= 1 (bools refused), as an int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_binary_labels(labels, name: str = "labels", length: int | None = None) -> np.ndarray:
    """A 1-D vector of 0/1 (or bool) pair labels, 1 meaning genuine (same identity)."""
    array = to_numpy(labels, name)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if length is not None and array.shape[0] != length:
        raise ValueError(f"{name} has {array.shape[0]} entries, expected {length}")
    if array.dtype != np.bool_:
        if not np.isin(array, (0, 1)).all():
            raise ValueError(f"{name} must be binary (0/1 or bool)")
    return array.astype(bool)


def check_same_dimension(first: np.ndarray, second: np.ndarray, first_name: str, second_name: str):
    """Two feature matrices (n, d) that are compared with each other must share d."""
    if first.shape[1] != second.shape[1]:
        raise ValueError(
            f"{first_name} have dimension {first.shape[1]} but {second_name} have {second.shape[1]}"
        )


def check_protocol_ids(
    q_pids, g_pids, q_camids, g_camids, num_query: int, num_gallery: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four id vectors of a re-ID evaluation as int64, each of its set's length; sets non-empty."""
    if num_query == 0:
        raise ValueError("the query set is empty")
    if num_gallery == 0:
        raise ValueError("the gallery is empty")
    return (
        check_ids(q_pids, "q_pids", num_query),
        check_ids(g_pids, "g_pids", num_gallery),
        check_ids(q_camids, "q_camids", num_query),
        check_ids(g_camids, "g_camids", num_gallery),
    )


def check_valid_queries(num_positives: np.ndarray) -> np.ndarray:
    """The queries with at least one positive; a ValueError when there is none."""
    valid = num_positives > 0
    if not valid.any():
        raise ValueError(
            "no query has a positive: no gallery item shares a query's pid under another camera"
        )
    return valid
