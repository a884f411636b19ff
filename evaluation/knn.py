"""Exact top-k search back end: FAISS flat indexes, on a GPU when faiss-gpu and a GPU are present.

Scores follow one convention, "larger is closer", so that re-ID and 1:N code can share it:
``metric="ip"`` returns inner products, ``metric="cosine"`` inner products of L2-normalised
vectors, ``metric="l2"`` negated squared euclidean distances.
"""

from __future__ import annotations

import numpy as np

from ._deprecation import warn_renamed
from .validation import (
    ArrayLike,
    DeviceLike,
    check_feature_pair,
    check_features,
    distance_rescaling_exponent,
)

METRICS = ("ip", "cosine", "l2")
# FAISS GPU flat search returns at most this many neighbours per query.
GPU_MAX_K = 2048


def gpu_available() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def l2_normalize(features: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm, in the features' precision.

    A row whose sum of squares overflows, or underflows below full precision, is first divided
    by the power of two of its largest entry (exact), so finite rows of any magnitude normalise
    correctly (e.g. 1e19- or 1e-23-scale float32 rows); other rows are untouched by that step.

    Raises:
        ValueError: a row is entirely zero.
    """
    with np.errstate(over="ignore", under="ignore"):  # such rows are found and redone below
        norms = np.linalg.norm(features, axis=1, keepdims=True)
    info = np.finfo(features.dtype)
    # Below this norm the sum of squares lies within 2^nmant of the subnormal range.
    smallest_safe_norm = np.sqrt(info.tiny * 2.0**info.nmant)
    unsafe = np.flatnonzero(~np.isfinite(norms[:, 0]) | (norms[:, 0] < smallest_safe_norm))
    if unsafe.size:
        rows = features[unsafe]
        largest = np.abs(rows).max(axis=1, keepdims=True)
        if (largest == 0).any():
            raise ValueError("cannot L2-normalise a zero feature vector")
        features = features.copy()
        features[unsafe] = np.ldexp(rows, -np.frexp(largest)[1])
        norms[unsafe] = np.linalg.norm(features[unsafe], axis=1, keepdims=True)
    return features / norms


def search_device(device: DeviceLike | bool = None, use_gpu: bool | None = None) -> str | None:
    """Where FAISS searches, from the ``device=`` of the evaluation functions.

    ``device``: ``None`` (a GPU when faiss-gpu and a GPU are usable, else the CPU), or a torch
    device (``"cpu"``, ``"cuda"``, ``"cuda:N"``, a ``torch.device``). FAISS searches on CUDA
    GPUs only, so any other device type (``"mps"``) searches on the CPU. ``use_gpu`` is the
    deprecated keyword this replaced (``True``: ``"cuda"``, ``False``: ``"cpu"``); a bool
    passed as ``device`` (an old positional ``use_gpu``) is read the same way.

    Returns:
        ``None`` (choose automatically), ``"cpu"`` or ``"cuda:N"``.

    Raises:
        TypeError: both ``device`` and ``use_gpu`` given.
        ValueError: ``device`` is not a torch device.
    """
    if isinstance(device, bool) or use_gpu is not None:
        if use_gpu is not None and device is not None:
            raise TypeError("pass device= or the deprecated use_gpu=, not both")
        warn_renamed("use_gpu=", "device='cuda' or device='cpu'", stacklevel=4)
        return "cuda:0" if (use_gpu if use_gpu is not None else device) else "cpu"
    if device is None:
        return None
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be None or a torch device, got {device!r}") from error
    if parsed.type != "cuda":
        return "cpu"
    return f"cuda:{parsed.index or 0}"


def _flat_index(dim: int, metric: str, device: str):
    import faiss

    index = faiss.IndexFlatL2(dim) if metric == "l2" else faiss.IndexFlatIP(dim)
    if device != "cpu":
        gpu = int(device.split(":")[1])
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), gpu, index)
    return index


def top_k(
    queries: ArrayLike,
    database: ArrayLike,
    k: int,
    metric: str = "cosine",
    device: DeviceLike = None,
    *,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` database rows closest to each query: ``(scores, indices)``, each of shape (nq, k).

    Exact (flat index) search, on the device :func:`search_device` reads from ``device``:
    ``None`` picks the GPU when one is usable and ``k`` is within FAISS's GPU limit of 2048;
    a CUDA device insists on it (``use_gpu=`` is deprecated for ``device=``). Scores are float32
    as FAISS computes them (its L2 formula differs from a direct ``‖q − g‖²`` in the last bits).
    For ``"cosine"`` the rows are normalised in their own precision before the float32 search,
    so any finite non-zero rows work.

    Raises:
        ValueError: bad arguments; for ``"ip"`` and ``"l2"``, features whose float32 scores
            would overflow or underflow (rescale them, or use ``"cosine"``).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    query_array = check_features(queries, "queries")
    database_array = check_features(database, "database")
    query_array, database_array = check_feature_pair(
        query_array, database_array, "queries", "the database rows"
    )
    if not 1 <= k <= database_array.shape[0]:
        raise ValueError(f"k must lie in [1, {database_array.shape[0]}], got {k}")
    device = search_device(device, use_gpu)
    if device is None:
        device = "cuda:0" if k <= GPU_MAX_K and gpu_available() else "cpu"
    elif device != "cpu":
        if not gpu_available():
            raise ValueError(f"device={device!r} but faiss-gpu with a visible GPU is not available")
        if k > GPU_MAX_K:
            raise ValueError(f"FAISS GPU search returns at most {GPU_MAX_K} neighbours, asked {k}")
    if metric == "cosine":
        query_array, database_array = l2_normalize(query_array), l2_normalize(database_array)
    elif distance_rescaling_exponent((query_array, database_array), np.float32):
        raise ValueError(
            f"metric={metric!r} scores of these features overflow or underflow float32 "
            "(FAISS's precision): rescale the features or use metric='cosine'"
        )
    query_array = np.ascontiguousarray(query_array, dtype=np.float32)
    database_array = np.ascontiguousarray(database_array, dtype=np.float32)
    index = _flat_index(database_array.shape[1], metric, device)
    index.add(database_array)
    scores, indices = index.search(query_array, k)
    if metric == "l2":
        scores = -scores
    return scores, indices
