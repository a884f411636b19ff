"""k-reciprocal re-ranking benchmark: the sparse, blocked evaluator against the dense algorithm.

Synthetic random features with realistic shapes (identity centres + camera bias + noise, as in
bench_reid.py): Market-1501-shaped (3,368 + 15,913 images, 2048-d) and MSMT17-shaped
(11,659 + 82,161, 512-d). Each case runs in a fresh process (benchmarks/_harness.py) that
reports its wall time (once, after a tiny warm-up so numba's cached code is loaded) and peak RSS.

- ``sparse``: ``evaluate_reid(..., rerank=True)`` (paper parameters k1=20, k2=6, λ=0.3), from
  features to metrics.
- ``dense``: the authors' algorithm with dense (N, N) float32 matrices (original distance,
  weights, neighbour ranks), the Jaccard term through per-column non-zero lists as in their code,
  then the same evaluator on the final (Q, G) matrix. It needs about 4 (N, N) float32/int32
  matrices: ~6 GB at Market shape, ~140 GB at MSMT17 shape (not run there).

Run: ``flock /tmp/bench.lock env PYTHONPATH=. python benchmarks/bench_rerank.py [--only market]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (  # noqa: E402
    machine_description,
    measure_in_fresh_process,
    peak_rss_bytes,
    run_case_if_asked,
)

PROBLEMS = {
    # name: (queries, gallery, ids, cameras, dim)
    "market": (3368, 15913, 751, 6, 2048),
    "msmt17": (11659, 82161, 3060, 15, 512),
}
CASES = {"market": ("sparse", "dense"), "msmt17": ("sparse",)}


def make_problem(name: str, seed: int = 0):
    num_query, num_gallery, num_ids, num_cams, dim = PROBLEMS[name]
    rng = np.random.default_rng(seed)
    scale = 1.4 / dim**0.25
    centres = rng.standard_normal((num_ids, dim), dtype=np.float32) * scale
    camera_bias = rng.standard_normal((num_cams, dim), dtype=np.float32) * (scale / 2)
    q_pids, g_pids = rng.integers(0, num_ids, num_query), rng.integers(0, num_ids, num_gallery)
    q_camids, g_camids = (
        rng.integers(0, num_cams, num_query),
        rng.integers(0, num_cams, num_gallery),
    )

    def features(pids, camids):
        out = rng.standard_normal((len(pids), dim), dtype=np.float32)
        out += centres[pids]
        out += camera_bias[camids]
        return out

    ids = (q_pids, g_pids, q_camids, g_camids)
    return features(q_pids, q_camids), features(g_pids, g_camids), ids


def dense_rerank(query, gallery, k1=20, k2=6, lambda_value=0.3):
    """The authors' algorithm on dense float32 matrices (squared euclidean distances)."""
    import torch

    num_query = len(query)
    joint = torch.from_numpy(np.concatenate([query, gallery]))
    squared = (joint * joint).sum(1)
    original = (squared[:, None] + squared[None, :]).addmm_(joint, joint.T, alpha=-2).numpy()
    original /= original.max(axis=0)
    original = np.ascontiguousarray(original.T)
    rank = np.argsort(original, axis=1).astype(np.int32)
    num_items = len(original)
    half = int(np.around(k1 / 2))

    def reciprocal(item, k):
        forward = rank[item, : k + 1]
        return forward[np.nonzero(rank[forward, : k + 1] == item)[0]]

    weights = np.zeros_like(original)
    for item in range(num_items):
        base = reciprocal(item, k1)
        expanded = base
        for candidate in base:
            candidate_set = reciprocal(candidate, half)
            if len(np.intersect1d(candidate_set, base)) > 2 / 3 * len(candidate_set):
                expanded = np.append(expanded, candidate_set)
        expanded = np.unique(expanded)
        weight = np.exp(-original[item, expanded])
        weights[item, expanded] = weight / weight.sum()
    if k2 != 1:
        expanded_weights = np.zeros_like(weights)
        for item in range(num_items):
            expanded_weights[item] = weights[rank[item, :k2]].mean(axis=0)
        weights = expanded_weights
    rank = None  # free the (N, N) ranks before the Jaccard pass
    # Non-zero rows of each column (the authors' inverted index), read from a transposed copy.
    columns = [np.nonzero(row)[0] for row in np.ascontiguousarray(weights.T)]
    final = np.empty((num_query, num_items - num_query), dtype=np.float32)
    for item in range(num_query):
        shared = np.zeros(num_items, dtype=np.float32)
        for column in np.nonzero(weights[item])[0]:
            rows = columns[column]
            shared[rows] += np.minimum(weights[item, column], weights[rows, column])
        jaccard = 1 - shared / (2 - shared)
        final[item] = ((1 - lambda_value) * jaccard + lambda_value * original[item])[num_query:]
    return final


def run_case(problem: str, case: str) -> dict:
    from evaluation.reid import evaluate_reid, evaluate_reid_from_distances

    tiny_query, tiny_gallery, tiny_ids = make_problem_tiny()
    evaluate_reid(tiny_query, tiny_gallery, *tiny_ids, rerank=True, device="cpu")  # warm-up
    query, gallery, ids = make_problem(problem)
    start = time.perf_counter()
    if case == "sparse":
        result = evaluate_reid(query, gallery, *ids, rerank=True, device="cpu")
    elif case == "dense":
        result = evaluate_reid_from_distances(dense_rerank(query, gallery), *ids)
    else:
        raise ValueError(f"unknown case {case!r}")
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    plain_start = time.perf_counter()
    plain = evaluate_reid(query, gallery, *ids, device="cpu")
    plain_seconds = time.perf_counter() - plain_start
    return {
        "time": seconds,
        "peak_rss_mb": peak / 2**20,
        "mAP": result.mAP,
        "rank1": result.rank(1),
        "plain_time": plain_seconds,
        "plain_mAP": plain.mAP,
    }


def make_problem_tiny():
    rng = np.random.default_rng(1)
    features = rng.standard_normal((60, 8), dtype=np.float32)
    pids, camids = rng.integers(0, 5, 60), rng.integers(0, 3, 60)
    ids = (pids[:10], pids[10:], camids[:10], camids[10:])
    return features[:10], features[10:], ids


def main() -> None:
    if run_case_if_asked(run_case):
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=PROBLEMS)
    parser.add_argument("--case", choices=("sparse", "dense"))
    args = parser.parse_args()
    print(f"machine: {machine_description()}")
    print("| problem | method | time (s) | peak RSS (MB) | mAP | rank-1 | plain evaluation (s) |")
    print("|---|---|---|---|---|---|---|")
    for problem in [args.only] if args.only else list(PROBLEMS):
        for case in CASES[problem]:
            if args.case and case != args.case:
                continue
            row = measure_in_fresh_process(__file__, problem=problem, case=case)
            print(
                f"| {problem} | {case} | {row['time']:.1f} | {row['peak_rss_mb']:.0f} "
                f"| {row['mAP']:.6f} | {row['rank1']:.4f} | {row['plain_time']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
