"""Mean ± standard deviation over seeds, the terminal / markdown table, and the JSON file."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .run import RunResult

# (metric key, column title, factor applied before printing, decimals)
COLUMNS = (
    ("accuracy", "acc %", 100, 1),
    ("class_margin_deg", "class margin °", 1, 1),
    ("sample_margin_min", "min γ", 1, 2),
    ("sample_margin_mean", "mean γ", 1, 3),
    ("mAP", "mAP %", 100, 1),
    ("rank1", "R-1 %", 100, 1),
    ("eer", "EER %", 100, 2),
    ("tar@far=0.01", "TAR@1e-2 %", 100, 1),
    ("tar@far=0.001", "TAR@1e-3 %", 100, 1),
    ("tail_accuracy", "acc 7-9 %", 100, 1),
)


def summarize(results: Sequence[RunResult]) -> list[dict]:
    """One entry per method, in table order: its settings, per-seed metrics, mean and std.

    The std is the sample standard deviation (ddof = 1) over seeds; 0 for a single seed.
    """
    by_method: dict[str, list[RunResult]] = {}
    for result in results:
        by_method.setdefault(result.method.label, []).append(result)
    summary = []
    for label, runs in by_method.items():
        method = runs[0].method
        scalar_keys = [k for k, v in runs[0].metrics.items() if isinstance(v, (int, float))]
        stats = {}
        for key in scalar_keys:
            values = np.array([run.metrics[key] for run in runs], dtype=float)
            std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            stats[key] = {"mean": float(values.mean()), "std": std}
        summary.append(
            {
                "method": label,
                "key": method.key,
                "loss": method.loss,
                "sample_margin_weight": method.sample_margin_weight,
                "zero_centroid_weight": method.zero_centroid_weight,
                "imbalance_ratio": method.imbalance_ratio,
                "seeds": [run.seed for run in runs],
                "runs": [run.metrics for run in runs],
                "summary": stats,
                "training_margins": [run.training_margins for run in runs],
            }
        )
    return summary


def _cell(stats: dict, key: str, factor: float, decimals: int) -> str:
    mean, std = stats[key]["mean"] * factor, stats[key]["std"] * factor
    if math.isnan(mean):
        return "nan"
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def markdown_table(summary: Sequence[dict]) -> str:
    """The table as GitHub markdown (also readable in a terminal)."""
    header = ["method"] + [title for _, title, _, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in summary:
        cells = [_cell(entry["summary"], key, f, d) for key, _, f, d in COLUMNS]
        lines.append("| " + " | ".join([entry["method"], *cells]) + " |")
    return "\n".join(lines)


def bounds_line(summary: Sequence[dict]) -> str:
    stats = summary[0]["summary"]
    return (
        f"Bounds: class margin ≤ {stats['class_margin_bound_deg']['mean']:.2f}°, "
        f"min γ ≤ C/(C−1) = {stats['sample_margin_bound']['mean']:.3f}."
    )


def write_json(path: Path, summary: Sequence[dict], config: dict) -> None:
    path.write_text(json.dumps({"config": config, "methods": list(summary)}, indent=2) + "\n")
