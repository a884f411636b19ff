"""Input checks shared by the re-ID and verification cores.

Every public metric function validates through these, so that bad input gives one clear
``ValueError`` naming the argument instead of a silent wrong number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Union

import numpy as np

if TYPE_CHECKING:
    import torch

#: What the evaluation functions accept as an array: numpy arrays, (CPU or GPU) torch tensors
#: and nested sequences of numbers.
ArrayLike = Union[np.ndarray, "torch.Tensor", Sequence]
#: Where torch computes distances: a device, its name ("cuda:0") or None (a GPU when one is there).
DeviceLike = Union[str, "torch.device", None]


def to_numpy(array: ArrayLike, name: str) -> np.ndarray:
    """Accept numpy arrays, array-likes and (CPU or GPU) torch tensors.

    Torch floating-point types numpy has no dtype for (bfloat16, the float8 types) are widened
    to float32, which holds each of their values exactly.
    """
    try:
        if hasattr(array, "detach") and hasattr(array, "cpu"):
            tensor = array.detach().cpu()
            if (
                tensor.is_floating_point()
                and tensor.element_size() < 4
                and str(tensor.dtype) != "torch.float16"
            ):
                tensor = tensor.float()
            array = tensor.numpy()
        return np.asarray(array)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{name} cannot be read as an array: {error}") from error


def check_features(features: ArrayLike, name: str, *, allow_empty: bool = False) -> np.ndarray:
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


def check_scores(scores: ArrayLike, name: str = "scores") -> np.ndarray:
    """A finite, non-empty 1-D numeric vector: floating point (float16 widened to float32) or
    integer, kept as it is so that distinct integers stay distinct (bools become int64)."""
    array = to_numpy(scores, name)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if array.dtype == np.bool_:
        array = array.astype(np.int64)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{name} must be numeric, got dtype {array.dtype}")
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return array


def check_ids(ids: ArrayLike, name: str, length: int | None = None) -> np.ndarray:
    """A 1-D integer vector (person ids, camera ids, class labels), optionally of a given length."""
    array = to_numpy(ids, name)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    if length is not None and array.shape[0] != length:
        raise ValueError(f"{name} has {array.shape[0]} entries, expected {length}")
    return array.astype(np.int64, copy=False)


def check_positive_integer(value: object, name: str) -> int:
    """A Python or numpy integer >= 1 (bools refused), as an int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_ranks(ranks: int | ArrayLike, name: str = "ranks") -> tuple[int, ...]:
    """The ranks ``k`` of rank-k rates: one positive integer or a non-empty sequence of them.

    Returns:
        The ranks as a tuple of ints, in the order given.

    Raises:
        ValueError: an empty sequence (no rate would be computed), a nested one, or a rank that
            is not a positive integer.
    """
    array = np.atleast_1d(to_numpy(ranks, name))
    if array.ndim != 1:
        raise ValueError(f"{name} must be one rank or a 1-D sequence of ranks, got {ranks!r}")
    if array.size == 0:
        raise ValueError(f"{name} must hold at least one rank, got {ranks!r}")
    return tuple(check_positive_integer(k, name) for k in array.tolist())


def check_binary_labels(
    labels: ArrayLike, name: str = "labels", length: int | None = None
) -> np.ndarray:
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


def check_same_dimension(
    first: np.ndarray, second: np.ndarray, first_name: str, second_name: str
) -> None:
    """Two feature matrices (n, d) that are compared with each other must share d."""
    if first.shape[1] != second.shape[1]:
        raise ValueError(
            f"{first_name} have dimension {first.shape[1]} but {second_name} have {second.shape[1]}"
        )


def check_feature_pair(
    first: np.ndarray, second: np.ndarray, first_name: str, second_name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Two checked feature matrices compared with each other: the same dimension, and both in
    the wider of their two floating-point types (float32 with float64 computes in float64)."""
    check_same_dimension(first, second, first_name, second_name)
    dtype = np.result_type(first.dtype, second.dtype)
    return first.astype(dtype, copy=False), second.astype(dtype, copy=False)


def _largest_magnitude(arrays: Sequence[np.ndarray]) -> float:
    return max((max(float(a.max()), -float(a.min())) for a in arrays if a.size), default=0.0)


def distance_rescaling_exponent(arrays: Sequence[np.ndarray], dtype: np.dtype | None = None) -> int:
    """The power of two to divide feature matrices by so that their inner products and squared
    euclidean distances neither overflow nor lose their precision to underflow in ``dtype``
    (default: the first array's); 0 when they need no rescaling.

    With every entry at most ``m = f · 2^e`` in magnitude (``0.5 <= f < 1``), a squared distance
    in ``d`` dimensions is at most ``4 d m² < d · 2^(2 e + 2)``. Dividing by ``2^e`` is exact, so
    the rescaled distances are the exact-range ones times ``4^-e``: the same ranks and ties.
    """
    info = np.finfo(arrays[0].dtype if dtype is None else dtype)
    largest = _largest_magnitude(arrays)
    if largest == 0:
        return 0
    exponent = int(np.frexp(largest)[1])
    dim = arrays[0].shape[1]
    overflows = 2 * exponent + 2 + math.ceil(math.log2(dim)) >= info.maxexp
    underflows = 2 * exponent < info.minexp + info.nmant
    return exponent if overflows or underflows else 0


def check_protocol_ids(
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    num_query: int,
    num_gallery: int,
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
