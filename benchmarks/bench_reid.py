"""Re-ID evaluator benchmark: our counting evaluator against a straightforward torchreid-style one.

Two synthetic problems with realistic shapes (identity centres + camera bias + noise, tuned to
a trained-model-like mAP): Market-1501-shaped (3,368 x 15,913, 751 ids, 6 cameras, 2048-d) and
MSMT17-shaped (11,659 x 82,161, 3,060 ids, 15 cameras, 128-d). Every case runs in a fresh
subprocess, which reports its wall time (after a tiny warm-up call, so numba's cached
compilation is not timed) and its peak RSS (the whole process: inputs, torch, everything).

The baseline is the torchreid algorithm written with numpy: one full ``np.argsort`` of the
distance matrix, then per query the junk mask, cumulative sums, AP and INP. When the machine
has too little free memory for its full MSMT17 matrices (~12 GB), it runs the same per-row
work in blocks of queries (full argsort per block) and the table says so.

Run: ``flock /tmp/bench.lock env PYTHONPATH=. python benchmarks/bench_reid.py``
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from _harness import (
    machine_description,
    measure_in_fresh_process,
    peak_rss_bytes,
    run_case_if_asked,
)

PROBLEMS = {
    # name: (queries, gallery, ids, cameras, dim, distractor fraction, separation)
    "market": (3368, 15913, 751, 6, 2048, 0.18, 2.2),
    "msmt17": (11659, 82161, 3060, 15, 128, 0.0, 2.5),
}
BASELINE_FULL_BYTES_PER_ELEMENT = 4 + 8 + 1  # float32 distances, int64 argsort, bool matches
BASELINE_BLOCK_ROWS = 1024


def make_problem(name: str, seed: int = 0):
    num_query, num_gallery, num_ids, num_cams, dim, distractors, separation = PROBLEMS[name]
    rng = np.random.default_rng(seed)
    scale = separation / dim**0.25
    centres = rng.standard_normal((num_ids + 1, dim), dtype=np.float32) * scale
    camera_bias = rng.standard_normal((num_cams, dim), dtype=np.float32) * (scale / 2)
    q_pids = rng.integers(1, num_ids + 1, num_query)
    g_pids = rng.integers(1, num_ids + 1, num_gallery)
    g_pids[rng.random(num_gallery) < distractors] = 0  # pid 0: distractors with no match
    q_camids = rng.integers(0, num_cams, num_query)
    g_camids = rng.integers(0, num_cams, num_gallery)

    def features(pids, camids):
        out = rng.standard_normal((len(pids), dim), dtype=np.float32)
        out += centres[pids]
        out += camera_bias[camids]
        return out

    return (
        features(q_pids, q_camids),
        features(g_pids, g_camids),
        q_pids,
        g_pids,
        q_camids,
        g_camids,
    )


def torch_distances(query, gallery):
    """torchreid's squared euclidean distance matrix, in full."""
    import torch

    q, g = torch.from_numpy(query), torch.from_numpy(gallery)
    distances = (q * q).sum(1, keepdim=True) + (g * g).sum(1)
    return distances.addmm_(q, g.T, alpha=-2).numpy()


def baseline_metrics(distance_rows, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """torchreid's algorithm, vectorised per query: full argsort of each row, then cumsums.

    ``distance_rows`` yields ``(first_query, block)``: the whole matrix at once, or query blocks.
    """
    all_cmc, all_ap, all_inp = [], [], []
    for first, block in distance_rows:
        indices = np.argsort(block, axis=1)
        for row, order in enumerate(indices):
            query = first + row
            same_pid = g_pids[order] == q_pids[query]
            keep = ~(same_pid & (g_camids[order] == q_camids[query]))
            matches = same_pid[keep]
            if not matches.any():
                continue
            hits = np.cumsum(matches)
            positions = np.flatnonzero(matches)
            all_inp.append(hits[positions[-1]] / (positions[-1] + 1))
            all_cmc.append(np.minimum(hits[:max_rank], 1))
            all_ap.append(np.sum(hits[positions] / (positions + 1)) / matches.sum())
        del indices
    return np.mean(all_cmc, axis=0), float(np.mean(all_ap)), float(np.mean(all_inp))


def baseline_distance_rows(query, gallery, block_rows):
    for first in range(0, len(query), block_rows):
        yield first, torch_distances(query[first : first + block_rows], gallery)


def run_case(problem: str, case: str, repeats: int) -> dict:
    """Best-of-``repeats`` wall time of one case, with its metrics and the process's peak RSS."""
    import torch

    from evaluation.reid import (
        DEFAULT_BLOCK_BYTES,
        evaluate_reid,
        evaluate_reid_from_distances,
    )

    query, gallery, q_pids, g_pids, q_camids, g_camids = make_problem(problem)
    ids = (q_pids, g_pids, q_camids, g_camids)
    tiny = make_problem_tiny()
    evaluate_reid(*tiny, device="cpu")  # warm-up: load numba's cached machine code
    evaluate_reid_from_distances(torch_distances(*tiny[:2]), *tiny[2:])
    evaluator_rows = max(1, DEFAULT_BLOCK_BYTES // (len(gallery) * 4))
    # The product alone in one call when its output fits in 1 GiB, else in the evaluator's blocks.
    product_rows = len(query) if len(query) * len(gallery) * 4 <= 2**30 else evaluator_rows
    result = {}

    def ours_metrics(metrics):
        return metrics.mAP, metrics.mINP, metrics.cmc[0]

    def baseline(distance_rows):
        cmc, mean_ap, minp = baseline_metrics(distance_rows, *ids)
        return mean_ap, minp, cmc[0]

    if case.endswith("-distances"):
        distmat = torch_distances(query, gallery)
    if case == "ours-distances":
        work = lambda: ours_metrics(evaluate_reid_from_distances(distmat, *ids))  # noqa: E731
    elif case == "baseline-distances":
        work = lambda: baseline([(0, distmat)])  # noqa: E731
    elif case == "ours-features":
        work = lambda: ours_metrics(evaluate_reid(query, gallery, *ids, device="cpu"))  # noqa: E731
    elif case == "baseline-features":
        needed = len(query) * len(gallery) * BASELINE_FULL_BYTES_PER_ELEMENT
        result["blocked"] = needed > _available_bytes() - 2 * 2**30
        rows = BASELINE_BLOCK_ROWS if result["blocked"] else len(query)
        work = lambda: baseline(baseline_distance_rows(query, gallery, rows))  # noqa: E731
    else:
        raise ValueError(f"unknown case {case!r}")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        metrics = work()
        times.append(time.perf_counter() - start)
    result["time"] = min(times)
    if metrics is not None:
        result["mAP"], result["mINP"], result["rank1"] = (float(m) for m in metrics)
    result["peak_rss_mb"] = peak_rss_bytes() / 2**20
    if case == "ours-features":
        # The query x gallery product alone, timed in the same warm process after the peak RSS
        # was read: in one call when its output fits in 1 GiB, else in the evaluator's blocks.
        q, g = torch.from_numpy(query), torch.from_numpy(gallery)
        result["product_rows"] = product_rows
        product_times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for first in range(0, len(query), product_rows):
                torch.mm(q[first : first + product_rows], g.T)
            product_times.append(time.perf_counter() - start)
        result["product_time"] = min(product_times)
    return result


def make_problem_tiny():
    rng = np.random.default_rng(1)
    pids = rng.integers(0, 5, 40)
    camids = rng.integers(0, 3, 40)
    features = rng.standard_normal((40, 8), dtype=np.float32)
    return features[:10], features[10:], pids[:10], pids[10:], camids[:10], camids[10:]


def _available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    if run_case_if_asked(run_case):
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    parser.add_argument("--only", choices=PROBLEMS, help="run one problem only")
    args = parser.parse_args()
    print(f"Machine: {machine_description()}")
    rows = []
    for problem in [args.only] if args.only else list(PROBLEMS):
        cases = ["ours-features", "baseline-features"]
        if problem == "market":
            cases = ["ours-distances", "baseline-distances"] + cases
        # The MSMT17-shaped baseline takes minutes: timed once.
        results = {
            case: measure_in_fresh_process(
                __file__,
                problem=problem,
                case=case,
                repeats=1 if (problem, case) == ("msmt17", "baseline-features") else args.repeats,
            )
            for case in cases
        }
        for case, result in results.items():
            print(f"{problem}/{case}: {json.dumps(result)}", file=sys.stderr)
        rows.append((problem, results))
    print()
    print(
        "| problem | input | ours (s) | baseline (s) | time ratio | ours peak RSS (MB) "
        "| baseline peak RSS (MB) | ours / Q×G product | mAP ours / baseline |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for problem, results in rows:
        pairs = [("features", "ours-features", "baseline-features")]
        if "ours-distances" in results:
            pairs.insert(0, ("distances", "ours-distances", "baseline-distances"))
        for label, ours_case, base_case in pairs:
            ours, base = results[ours_case], results[base_case]
            product = f"{ours['time'] / ours['product_time']:.2f}" if label == "features" else "–"
            note = " (blocked)" if base.get("blocked") else ""
            print(
                f"| {problem} | {label} | {ours['time']:.3f} | {base['time']:.3f}{note} "
                f"| {ours['time'] / base['time']:.3f} | {ours['peak_rss_mb']:.0f} "
                f"| {base['peak_rss_mb']:.0f} | {product} "
                f"| {ours['mAP']:.6f} / {base['mAP']:.6f} |"
            )
    for problem, results in rows:
        print(
            f"\n{problem}: Q×G product alone {results['ours-features']['product_time']:.3f} s "
            f"(blocks of {results['ours-features']['product_rows']} queries)"
        )


if __name__ == "__main__":
    main()
