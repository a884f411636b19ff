"""The demo's figures: margins against their bounds, prototype geometry, ROC curves.

matplotlib is imported only when a figure is drawn (``pml_largest_margin.plotting``), so the rest of
the package works without it. Every panel has both axis labels; legends sit outside the axes;
balanced and long-tailed rows are drawn in separate panels; each figure says which seeds it
shows and what its error bars are.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..plotting import pyplot
from .run import RunResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure


__all__ = [
    "FIGURE_NAMES",
    "margins_figure",
    "prototype_figure",
    "roc_figure",
    "write_figures",
]

FIGURE_NAMES = ("margins.png", "prototypes.png", "roc.png")

# Prototype heatmaps drawn, when these methods were run.
GEOMETRY_METHODS = (
    "Softmax CE",
    "NormFace",
    "LM-Softmax",
    "NormFace + R_sm",
    "NormFace LT100",
    "NormFace + ZC LT100",
)
# Legends go to the right of their axes, never over the data.
OUTSIDE_RIGHT = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": 8}
# The margin monitor's per-epoch figure (MarginMonitor.plot) is drawn for these runs (first seed).
TRAINING_CURVE_METHODS = ("NormFace", "LM-Softmax")


def _seeds_text(seeds: Sequence[int]) -> str:
    return f"seed {seeds[0]}" if len(seeds) == 1 else "seeds " + ", ".join(map(str, seeds))


def _margin_panels(axes_pair, group: Sequence[dict], title: str) -> None:
    class_axis, sample_axis = axes_pair
    positions = np.arange(len(group))
    labels = [entry["method"] for entry in group]

    def stat(key, which="mean"):
        return np.array([entry["summary"][key][which] for entry in group])

    def per_seed(axis, key, offset=0.0):
        # Every seed's own value, so that a single failed seed is visible as such.
        for position, entry in zip(positions, group, strict=True):
            values = [run[key] for run in entry["runs"]]
            axis.plot([position + offset] * len(values), values, "k.", ms=3, zorder=3)

    class_axis.bar(positions, stat("class_margin_deg"), yerr=stat("class_margin_deg", "std"))
    per_seed(class_axis, "class_margin_deg")
    class_axis.axhline(stat("class_margin_bound_deg")[0], color="k", ls="--")
    class_axis.set(ylabel="class margin (degrees)", ylim=(0, 110), title=f"{title}: class margin")
    width = 0.4
    for offset, key, label in (
        (-width / 2, "sample_margin_mean", "mean γ"),
        (width / 2, "sample_margin_min", "min γ"),
    ):
        sample_axis.bar(positions + offset, stat(key), width, label=label, yerr=stat(key, "std"))
        per_seed(sample_axis, key, offset)
    sample_axis.axhline(stat("sample_margin_bound")[0], color="k", ls="--", label="bound")
    sample_axis.plot([], [], "k.", ms=3, label="one seed")
    sample_axis.set(ylabel="test sample margin γ", title=f"{title}: sample margins")
    sample_axis.legend(**OUTSIDE_RIGHT)
    for axis in axes_pair:
        axis.set_xticks(positions, labels, rotation=60, ha="right", fontsize=8)
        axis.set_xlabel("method")


def margins_figure(summary: Sequence[dict]) -> Figure:
    """Class margin and test sample margins per method, balanced and long-tailed rows apart.

    Bars: mean over seeds; error bars: ± one sample standard deviation (ddof 1); dots: every
    seed; dashed lines: the bounds arccos(−1/(C−1)) and C/(C−1).
    """
    plt = pyplot()
    groups = [
        (title, [entry for entry in summary if balanced == (entry["imbalance_ratio"] == 1)])
        for title, balanced in (("balanced", True), ("long-tailed", False))
    ]
    groups = [(title, group) for title, group in groups if group]
    figure, axes = plt.subplots(
        len(groups),
        2,
        figsize=(13, 4.6 * len(groups)),
        squeeze=False,
        constrained_layout=True,
    )
    for axes_pair, (title, group) in zip(axes, groups, strict=True):
        _margin_panels(axes_pair, group, title)
    seeds = summary[0]["seeds"]
    figure.suptitle(
        f"Bars: mean over {_seeds_text(seeds)}; error bars: ± 1 sample standard deviation "
        "(ddof 1) over seeds; dots: each seed; dashed: the upper bound "
        "(arccos(−1/(C−1)) for the class margin, C/(C−1) for the sample margin)",
        fontsize=9,
    )
    return figure


def prototype_figure(results: Sequence[RunResult]) -> Figure:
    """Cosines between the learned prototypes of the first seed's runs (a regular simplex has
    −1/(C−1) off the diagonal), or ``None`` when none of ``GEOMETRY_METHODS`` was run."""
    plt = pyplot()
    chosen = {r.method.label: r for r in results if r.prototype_cosines is not None}
    labels = [label for label in GEOMETRY_METHODS if label in chosen]
    if not labels:
        return None
    columns = min(3, len(labels))
    rows = -(-len(labels) // columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(3.6 * columns, 3.6 * rows), squeeze=False, constrained_layout=True
    )
    for axis in axes.flat[len(labels) :]:
        axis.axis("off")
    for axis, label in zip(axes.flat, labels, strict=False):
        result = chosen[label]
        cosines = np.asarray(result.prototype_cosines)
        image = axis.imshow(cosines, vmin=-1, vmax=1, cmap="RdBu_r")
        axis.set_title(f"{label} (seed {result.seed})", fontsize=9)
        axis.set_xticks(range(len(cosines)))
        axis.set_yticks(range(len(cosines)))
        axis.tick_params(labelsize=6)
        axis.set(xlabel="class k", ylabel="class j")
    figure.colorbar(image, ax=axes, shrink=0.8, label="cos(w_j, w_k)")
    return figure


def roc_figure(results: Sequence[RunResult]) -> Figure:
    """ROC of all test pairs for each method's first seed, balanced and long-tailed apart."""
    plt = pyplot()
    with_roc = [result for result in results if result.roc]
    groups = [
        (title, [r for r in with_roc if balanced == (r.method.imbalance_ratio == 1)])
        for title, balanced in (("balanced", True), ("long-tailed", False))
    ]
    groups = [(title, group) for title, group in groups if group]
    if not groups:
        return None
    figure, axes = plt.subplots(
        1, len(groups), figsize=(7.5 * len(groups), 4.5), squeeze=False, constrained_layout=True
    )
    for axis, (title, group) in zip(axes[0], groups, strict=True):
        for result in group:
            axis.plot(result.roc["far"], result.roc["tar"], label=result.method.label, lw=1.2)
        axis.set_xscale("log")
        axis.set_xlim(1e-5, 1)
        axis.set(xlabel="false accept rate", ylabel="true accept rate")
        axis.set_title(f"{title} training set, {_seeds_text(sorted({r.seed for r in group}))}")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(**OUTSIDE_RIGHT)
    return figure


def write_figures(summary: Sequence[dict], results: Sequence[RunResult], directory: Path) -> list:
    """All figures into ``directory``; returns the paths written.

    Besides the summary figures (``FIGURE_NAMES``), ``training-margins-KEY.png`` for each method
    of ``TRAINING_CURVE_METHODS`` that was run: its first seed's margins per epoch, against the
    bounds.
    """
    plt = pyplot()
    figures = (margins_figure(summary), prototype_figure(results), roc_figure(results))
    paths = []
    for name, figure in zip(FIGURE_NAMES, figures, strict=True):
        if figure is None:
            continue
        paths.append(directory / name)
        figure.savefig(paths[-1], dpi=80)
        plt.close(figure)
    for result in results:
        if result.monitor is not None and result.method.label in TRAINING_CURVE_METHODS:
            paths.append(directory / f"training-margins-{result.method.key}.png")
            result.monitor.plot(paths[-1])
    return paths
