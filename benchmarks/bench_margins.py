"""Class margin in tiles against the naive C × C matrix, and maximally separated prototypes.

Run under the shared lock:  flock /tmp/bench.lock env PYTHONPATH=. python benchmarks/bench_margins.py
Each case runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own. "Peak beyond W" is
that peak minus the RSS just before the call, when the interpreter, torch and W are already
resident. Cases whose full run exceeds ``--time-budget`` seconds scan only the first row blocks
of tiles until the budget is spent; their time is extrapolated by the share of tiles scanned and
labelled as such (every tile has the same size, so the peak memory of the partial scan is that of
the full scan). The tiled time is that of class_margin's own tile loop (its private helper called
one row block at a time, which is how the scan can stop early), without the final float64 angle
of the closest pair, which costs microseconds.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from _harness import (
    current_rss_bytes,
    machine_description,
    measure_in_fresh_process,
    peak_rss_bytes,
    run_case_if_asked,
)

NAIVE_LIMIT_BYTES = 4 * 2**30
PROTOTYPE_CASES = [(10, 3, 66.0), (20, 3, 47.3), (100, 16, 76.5), (1000, 64, 80.8)]


def naive_class_margin(W: torch.Tensor) -> float:
    unit = torch.nn.functional.normalize(W, dim=0)
    cosines = unit.t() @ unit
    cosines.fill_diagonal_(-2.0)
    return math.acos(float(cosines.max().clamp(-1, 1)))


def run_class_margin_case(num_classes: int, dim: int, method: str, time_budget: float) -> dict:
    from pml_largest_margin import margins

    # Warm up both code paths (thread pool, BLAS kernels for these shapes) on a small W, so the
    # timings are steady-state ones.
    warm_up = torch.randn(dim, 3 * margins._TILE_SIZE - 1)
    naive_class_margin(warm_up)
    margins.class_margin(warm_up)
    W = torch.randn(dim, num_classes, generator=torch.Generator().manual_seed(0))
    before = current_rss_bytes()
    assert peak_rss_bytes() <= before + 64 * 2**20, (
        "a transient before the call would hide the peak"
    )
    start = time.perf_counter()
    result = {}
    if method == "naive":
        result["degrees"] = math.degrees(naive_class_margin(W))
    else:
        tile = margins._TILE_SIZE
        row_starts = list(range(0, num_classes, tile))
        blocks = len(row_starts)
        total_tiles = blocks * (blocks + 1) // 2
        inverse_norms = margins._inverse_column_norms(W)
        scanned_tiles, scanned_rows = 0, 0
        best = -math.inf
        for index, row_start in enumerate(row_starts):
            cosine, _ = margins._closest_pair_in_row_blocks(
                W, inverse_norms, tile, range(row_start, row_start + 1)
            )
            best = max(best, cosine)
            scanned_tiles += blocks - index
            scanned_rows += 1
            if time.perf_counter() - start > time_budget and scanned_rows < blocks:
                break
        if scanned_rows == blocks:
            result["degrees"] = math.degrees(math.acos(min(1.0, best)))
        result["share"] = scanned_tiles / total_tiles
        result["scanned"] = f"{scanned_rows}/{blocks} row blocks"
    elapsed = time.perf_counter() - start
    result["seconds"] = elapsed / result.get("share", 1.0)
    result["peak_beyond_w_mb"] = (peak_rss_bytes() - before) / 2**20
    result["w_mb"] = W.numel() * W.element_size() / 2**20
    return result


def run_prototype_case(num_classes: int, dim: int) -> dict:
    from pml_largest_margin.prototypes import max_separated_prototypes

    start = time.perf_counter()
    result = max_separated_prototypes(num_classes, dim, progress=False)
    return {
        "seconds": time.perf_counter() - start,
        "degrees": result.degrees,
        "bound": result.upper_bound_degrees,
        "peak_mb": peak_rss_bytes() / 2**20,
    }


def run_case(kind: str, **params) -> dict:
    """One measurement in this (fresh) process."""
    if kind == "class_margin":
        return run_class_margin_case(**params)
    return run_prototype_case(**params)


def class_margin_table(sizes, dims, time_budget) -> None:
    print("\n### class_margin (float32 W, tiles of 1024 × 1024)\n")
    print(
        "| C | d | W (MB) | tiled time (s) | tiled peak beyond W (MB) | naive time (s) "
        "| naive peak beyond W (MB) | naive / tiled time | margin (°) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for num_classes in sizes:
        for dim in dims:
            tiled = measure_in_fresh_process(
                __file__,
                kind="class_margin",
                num_classes=num_classes,
                dim=dim,
                method="tiled",
                time_budget=time_budget,
            )
            naive_bytes = 4 * num_classes**2
            time_note = f"{tiled['seconds']:.2f}"
            if tiled["share"] < 1.0:
                time_note = (
                    f"≈{tiled['seconds']:.3g} (extrapolated: measured {tiled['scanned']}, "
                    f"{100 * tiled['share']:.2f}% of the tiles)"
                )
            if naive_bytes <= NAIVE_LIMIT_BYTES:
                naive = measure_in_fresh_process(
                    __file__,
                    kind="class_margin",
                    num_classes=num_classes,
                    dim=dim,
                    method="naive",
                    time_budget=time_budget,
                )
                naive_cells = (
                    f"{naive['seconds']:.2f} | {naive['peak_beyond_w_mb']:.0f} | "
                    f"{naive['seconds'] / tiled['seconds']:.1f}×"
                )
                if "degrees" in tiled:
                    assert abs(naive["degrees"] - tiled["degrees"]) < 1e-3, (naive, tiled)
            else:
                naive_cells = (
                    f"infeasible: the C × C matrix alone is {naive_bytes / 2**30:,.0f} GB | – | –"
                )
            degrees = f"{tiled['degrees']:.3f}" if "degrees" in tiled else "– (partial scan)"
            print(
                f"| {num_classes:,} | {dim} | {tiled['w_mb']:.0f} | {time_note} | "
                f"{tiled['peak_beyond_w_mb']:.0f} | {naive_cells} | {degrees} |",
                flush=True,
            )


def prototype_table() -> None:
    print("\n### max_separated_prototypes (defaults: 2000 steps, seed 0)\n")
    print("| C | d | min angle (°) | floor (°) | upper bound (°) | time (s) | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|")
    for num_classes, dim, floor in PROTOTYPE_CASES:
        result = measure_in_fresh_process(
            __file__, kind="prototypes", num_classes=num_classes, dim=dim
        )
        mark = "✓" if result["degrees"] >= floor else "✗ below"
        print(
            f"| {num_classes} | {dim} | {result['degrees']:.3f} {mark} | {floor} | "
            f"{result['bound']:.2f} | {result['seconds']:.1f} | {result['peak_mb']:.0f} |",
            flush=True,
        )


def main() -> None:
    if run_case_if_asked(run_case):
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    parser.add_argument(
        "--time-budget",
        type=float,
        default=60.0,
        help="seconds after which a tiled case stops and extrapolates (default 60)",
    )
    parser.add_argument("--skip-prototypes", action="store_true")
    args = parser.parse_args()
    print(f"Machine: {machine_description()}")
    class_margin_table(args.sizes, args.dims, args.time_budget)
    if not args.skip_prototypes:
        prototype_table()


if __name__ == "__main__":
    main()
