"""The demo's figures: margins against their bounds, prototype geometry, ROC curves.

matplotlib is imported only when a figure is drawn (``pml_largest_margin.plotting``), so the rest of
the package works without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..plotting import pyplot
from .run import RunResult

# Prototype heatmaps drawn, when these methods were run.
GEOMETRY_METHODS = (
    "Softmax CE",
    "NormFace",
    "LM-Softmax",
    "NormFace + R_sm",
    "NormFace LT100",
    "NormFace + ZC LT100",
)
# The margin monitor's per-epoch figure (MarginMonitor.plot) is drawn for these runs (first seed).
TRAINING_CURVE_METHODS = ("NormFace", "LM-Softmax")


def plot_margins(summary: Sequence[dict], path: Path) -> None:
    """Class margin and sample margins (mean ± std over seeds) per method, with their bounds."""
    plt = pyplot()
    labels = [entry["method"] for entry in summary]
    positions = np.arange(len(labels))

    def stat(key, which="mean"):
        return np.array([entry["summary"][key][which] for entry in summary])

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    left.bar(positions, stat("class_margin_deg"), yerr=stat("class_margin_deg", "std"))
    left.axhline(stat("class_margin_bound_deg")[0], color="k", ls="--", label="arccos(−1/(C−1))")
    left.set_ylabel("class margin (degrees)")
    left.set_ylim(0, 110)
    width = 0.4
    right.bar(
        positions - width / 2,
        stat("sample_margin_mean"),
        width,
        label="mean γ",
        yerr=stat("sample_margin_mean", "std"),
    )
    right.bar(
        positions + width / 2,
        stat("sample_margin_min"),
        width,
        label="min γ",
        yerr=stat("sample_margin_min", "std"),
    )
    right.axhline(stat("sample_margin_bound")[0], color="k", ls="--", label="C/(C−1)")
    right.set_ylabel("test sample margin γ")
    for axes in (left, right):
        axes.set_xticks(positions, labels, rotation=60, ha="right", fontsize=8)
        axes.legend(fontsize=8, loc="lower left")
    figure.savefig(path, dpi=80)
    plt.close(figure)


def plot_prototype_geometry(results: Sequence[RunResult], path: Path) -> None:
    """Cosines between the learned prototypes (first seed); a simplex has −1/(C−1) off-diagonal."""
    plt = pyplot()
    chosen = {r.method.label: r for r in results if r.prototype_cosines is not None}
    labels = [label for label in GEOMETRY_METHODS if label in chosen]
    if not labels:
        return
    columns = min(3, len(labels))
    rows = -(-len(labels) // columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(3.6 * columns, 3.4 * rows), squeeze=False, constrained_layout=True
    )
    for axis in axes.flat[len(labels) :]:
        axis.axis("off")
    for axis, label in zip(axes.flat, labels, strict=False):
        image = axis.imshow(chosen[label].prototype_cosines, vmin=-1, vmax=1, cmap="RdBu_r")
        axis.set_title(label, fontsize=9)
        axis.set_xticks(range(10))
        axis.set_yticks(range(10))
        axis.tick_params(labelsize=6)
    figure.colorbar(image, ax=axes, shrink=0.8, label="cos(w_j, w_k)")
    figure.savefig(path, dpi=80)
    plt.close(figure)


def plot_roc(results: Sequence[RunResult], path: Path) -> None:
    """ROC of all test pairs (first seed) for the methods trained on the balanced set."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 4.5), constrained_layout=True)
    for result in results:
        if result.roc and result.method.imbalance_ratio == 1:
            axis.plot(result.roc["far"], result.roc["tar"], label=result.method.label, lw=1.2)
    axis.set_xscale("log")
    axis.set_xlim(1e-5, 1)
    axis.set_xlabel("false accept rate")
    axis.set_ylabel("true accept rate")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    figure.savefig(path, dpi=80)
    plt.close(figure)


def write_figures(summary: Sequence[dict], results: Sequence[RunResult], directory: Path) -> list:
    """All figures into ``directory``; returns their paths.

    Besides the three summary figures, ``training-margins-KEY.png`` for each method of
    ``TRAINING_CURVE_METHODS`` that was run: its first seed's margins per epoch, against the
    bounds.
    """
    paths = [directory / "margins.png", directory / "prototypes.png", directory / "roc.png"]
    plot_margins(summary, paths[0])
    plot_prototype_geometry(results, paths[1])
    plot_roc(results, paths[2])
    for result in results:
        if result.monitor is not None and result.method.label in TRAINING_CURVE_METHODS:
            paths.append(directory / f"training-margins-{result.method.key}.png")
            result.monitor.plot(paths[-1])
    return [path for path in paths if path.exists()]
