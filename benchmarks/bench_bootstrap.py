"""Bootstrap intervals benchmark: 1,000 resamples on re-ID (Market shape) and 1:1 verification.

Synthetic random inputs (timing only): the Market-1501-shaped problem of bench_rerank.py
(3,368 x 15,913, 2048-d) evaluated once, then ``result.bootstrap(1000)`` timed alone (it only
reads per-query AP, INP and first-positive ranks); and 1,000,000 float32 pair scores (0.1 %
genuine, IJB-C-like) with ``verification_report(..., bootstrap=1000)`` timed against the plain
report, by pairs and by 10,000 subjects. Each case in a fresh process (benchmarks/_harness.py).

Run: ``flock /tmp/bench.lock env PYTHONPATH=. python benchmarks/bench_bootstrap.py``
"""

from __future__ import annotations

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

NUM_RESAMPLES = 1000
NUM_PAIRS = 1_000_000


def run_case(case: str) -> dict:
    if case == "reid":
        from bench_rerank import make_problem

        from evaluation.reid import evaluate_reid

        query, gallery, ids = make_problem("market")
        start = time.perf_counter()
        result = evaluate_reid(query, gallery, *ids, device="cpu")
        evaluation = time.perf_counter() - start
        start = time.perf_counter()
        intervals = result.bootstrap(NUM_RESAMPLES, seed=0)
        return {
            "evaluation": evaluation,
            "bootstrap": time.perf_counter() - start,
            "value": result.mAP,
            "interval": [intervals.mAP_low, intervals.mAP_high],
            "peak_rss_mb": peak_rss_bytes() / 2**20,
        }
    from evaluation.verification import verification_report

    rng = np.random.default_rng(0)
    labels = rng.random(NUM_PAIRS) < 1e-3
    scores = (rng.normal(size=NUM_PAIRS) * 0.1 + 0.35 * labels).astype(np.float32)
    subjects = rng.integers(0, 10_000, NUM_PAIRS) if case == "verification-subjects" else None
    start = time.perf_counter()
    report = verification_report(scores, labels)
    plain = time.perf_counter() - start
    start = time.perf_counter()
    report = verification_report(scores, labels, bootstrap=NUM_RESAMPLES, subjects=subjects)
    return {
        "evaluation": plain,
        "bootstrap": time.perf_counter() - start,
        "value": report.auc,
        "interval": list(report.intervals.auc),
        "peak_rss_mb": peak_rss_bytes() / 2**20,
    }


def main() -> None:
    if run_case_if_asked(run_case):
        return
    print(f"machine: {machine_description()}")
    print(
        "| case | evaluation alone (s) | with 1,000-resample bootstrap, extra (s) | value [95 % interval] | peak RSS (MB) |"
    )
    print("|---|---|---|---|---|")
    for case, label in (
        ("reid", "re-ID, Market shape: mAP"),
        ("verification-pairs", "1:1, 1M pairs, by pairs: AUC"),
        ("verification-subjects", "1:1, 1M pairs, by 10,000 subjects: AUC"),
    ):
        row = measure_in_fresh_process(__file__, case=case)
        low, high = row["interval"]
        print(
            f"| {label} | {row['evaluation']:.2f} | {row['bootstrap']:.2f} "
            f"| {row['value']:.4f} [{low:.4f}, {high:.4f}] | {row['peak_rss_mb']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
