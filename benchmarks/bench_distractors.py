"""Distractor curve benchmark: MegaFace-shaped identification against the products alone.

Synthetic random features (timing only): 3,530 probes of 3,530 identities with one gallery
mate each, and 1,000,000 x 512 float32 distractors (2 GB, generated in the case's process).
``curve``: :func:`evaluation.verification.identification_with_distractors` over the default
counts 0, 10, ..., 1,000,000 (ranks 1, 5, 10); ``products``: the probe x distractor products
alone (``probes @ block.T`` in numpy float32 over the same blocks, L2-normalised inputs);
``torch products``: the same products by torch, the library the curve uses for them.
One fresh process runs the curve and the products alternately, ``--rounds`` times each (a
shared machine's load then weighs on both alike), and reports the best of each; "extra memory"
is the peak RSS after the first curve minus the RSS once the inputs exist.

Run: ``flock /tmp/bench.lock env PYTHONPATH=. python benchmarks/bench_distractors.py [--rounds 2]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (  # noqa: E402
    current_rss_bytes,
    machine_description,
    measure_in_fresh_process,
    peak_rss_bytes,
    run_case_if_asked,
)

NUM_PROBES, NUM_DISTRACTORS, DIM = 3530, 1_000_000, 512


def make_problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((NUM_PROBES, DIM), dtype=np.float32)
    # Noise of twice the centres' scale: mates at cosine ~0.2, where the largest of 1M random
    # distractors (~0.2 too) starts to outrank them, so the curve falls as distractors are added.
    probes = centres + 2.0 * rng.standard_normal((NUM_PROBES, DIM), dtype=np.float32)
    gallery = centres + 2.0 * rng.standard_normal((NUM_PROBES, DIM), dtype=np.float32)
    distractors = np.empty((NUM_DISTRACTORS, DIM), dtype=np.float32)
    for first in range(0, NUM_DISTRACTORS, 100_000):
        distractors[first : first + 100_000] = rng.standard_normal((100_000, DIM), np.float32)
    ids = np.arange(NUM_PROBES)
    return probes, ids, gallery, ids, distractors


def run_case(rounds: int) -> dict:
    """Curve and products alternately, ``rounds`` times each, in this one process: a shared
    machine's load then weighs on both alike. Extra memory is the curve's first pass."""
    import torch

    from evaluation.knn import l2_normalize
    from evaluation.verification.distractors import (
        DEFAULT_BLOCK_ROWS,
        identification_with_distractors,
    )

    tiny = make_tiny()
    identification_with_distractors(*tiny)  # warm-up
    problem = make_problem()
    inputs_rss = current_rss_bytes()
    probes = l2_normalize(problem[0])
    probes_t = torch.from_numpy(probes)
    distractors = problem[4]

    def products(use_torch: bool) -> None:
        for first in range(0, NUM_DISTRACTORS, DEFAULT_BLOCK_ROWS):
            block = l2_normalize(distractors[first : first + DEFAULT_BLOCK_ROWS])
            if use_torch:
                probes_t @ torch.from_numpy(block).T
            else:
                probes @ block.T

    times = {"curve": [], "torch products": [], "products": []}
    extra_memory = None
    for _ in range(rounds):
        start = time.perf_counter()
        curve = identification_with_distractors(*problem)
        times["curve"].append(time.perf_counter() - start)
        if extra_memory is None:
            extra_memory = (peak_rss_bytes() - inputs_rss) / 2**20
            peak = peak_rss_bytes() / 2**20
        for case, use_torch in (("torch products", True), ("products", False)):
            start = time.perf_counter()
            products(use_torch)
            times[case].append(time.perf_counter() - start)
    return {
        "times": times,
        "extra_memory_mb": extra_memory,
        "peak_rss_mb": peak,
        "rank1": curve.rates[:, 0].tolist(),
        "counts": curve.distractor_counts.tolist(),
    }


def make_tiny():
    rng = np.random.default_rng(1)
    features = rng.standard_normal((60, 8), dtype=np.float32)
    ids = np.arange(10)
    return features[:10], ids, features[10:20], ids, features[20:]


def main() -> None:
    if run_case_if_asked(run_case):
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"machine: {machine_description()}")
    row = measure_in_fresh_process(__file__, rounds=args.rounds)
    best = {case: min(times) for case, times in row["times"].items()}
    print(f"| case | best of {args.rounds} (s) | every run (s) |")
    print("|---|---|---|")
    for case, times in row["times"].items():
        print(f"| {case} | {best[case]:.1f} | {', '.join(f'{t:.1f}' for t in times)} |")
    for baseline in ("products", "torch products"):
        print(f"curve / {baseline}: {best['curve'] / best[baseline]:.2f}")
    print(
        f"curve: extra memory over the inputs {row['extra_memory_mb']:.0f} MB, "
        f"peak RSS {row['peak_rss_mb']:.0f} MB"
    )
    print(
        "rank-1 by distractor count:",
        dict(zip(row["counts"], [round(r, 4) for r in row["rank1"]], strict=True)),
    )


if __name__ == "__main__":
    main()
