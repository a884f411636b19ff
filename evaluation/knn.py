"""Exact top-k search back end: FAISS flat indexes, on a GPU when faiss-gpu and a GPU are present.

Scores follow one convention, "larger is closer", so that re-ID and 1:N code can share it:
``metric="ip"`` returns inner products, ``metric="cosine"`` inner products of L2-normalised
vectors, ``metric="l2"`` negated squared euclidean distances.
"""

from __future__ import annotations

import numpy as np

from .validation import check_features, check_same_dimension

METRICS = ("ip", "cosine", "l2")
# FAISS GPU flat search returns at most this many neighbours per query.
GPU_MAX_K = 2048


def gpu_available() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def l2_normalize(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("cannot L2-normalise a zero feature vector")
    return features / norms


def _flat_index(dim: int, metric: str, use_gpu: bool):
    import faiss

    index = faiss.IndexFlatL2(dim) if metric == "l2" else faiss.IndexFlatIP(dim)
    if use_gpu:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index


def top_k(
    queries,
    database,
    k: int,
    metric: str = "cosine",
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` database rows closest to each query: ``(scores, indices)``, each of shape (nq, k).

    Exact (flat index) search. ``use_gpu=None`` picks the GPU when one is usable and ``k`` is within
    FAISS's GPU limit of 2048; ``True`` insists on it. Scores are float32 as FAISS computes them
    (its L2 formula differs from a direct ``‖q − g‖²`` in the last bits).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    query_array = check_features(queries, "queries")
    database_array = check_features(database, "database")
    check_same_dimension(query_array, database_array, "queries", "the database rows")
    if not 1 <= k <= database_array.shape[0]:
        raise ValueError(f"k must lie in [1, {database_array.shape[0]}], got {k}")
    if use_gpu is None:
        use_gpu = k <= GPU_MAX_K and gpu_available()
    elif use_gpu:
        if not gpu_available():
            raise ValueError("use_gpu=True but faiss-gpu with a visible GPU is not available")
        if k > GPU_MAX_K:
            raise ValueError(f"FAISS GPU search returns at most {GPU_MAX_K} neighbours, asked {k}")
    query_array = np.ascontiguousarray(query_array, dtype=np.float32)
    database_array = np.ascontiguousarray(database_array, dtype=np.float32)
    if metric == "cosine":
        query_array, database_array = l2_normalize(query_array), l2_normalize(database_array)
    index = _flat_index(database_array.shape[1], metric, use_gpu)
    index.add(database_array)
    scores, indices = index.search(query_array, k)
    if metric == "l2":
        scores = -scores
    return scores, indices
