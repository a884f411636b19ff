"""``pml-lm eval-verify``: 1:1 verification metrics from saved features or scores.

Input (``.npz``, read without pickles), one of:
- ``scores`` and ``labels``: one score per pair (larger = more similar), 1 for genuine;
- ``embeddings`` (2 n, d) and ``issame`` (n): interleaved pairs as in a ``.bin`` set; the
  10-fold accuracy is reported too;
- ``embeddings`` and ``pairs`` (n, 2) row indices with ``labels``, or ``--pairs`` naming a text
  file of lines ``i j label``.
Embeddings are scored by cosine similarity. ``--bootstrap N`` adds percentile intervals,
resampling the subjects of an optional ``subjects`` array (one id per pair), else the pairs.
``--distractors FILE`` (a ``.npy`` of distractor embeddings, memory-mapped) adds the rank-k
identification curve of ``probe_features``/``probe_subjects`` against
``gallery_features``/``gallery_subjects`` (in the ``.npz``) as distractors are added.
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import numpy as np

from evaluation.datasets.face import read_template_pairs
from evaluation.knn import l2_normalize
from evaluation.verification import (
    DEFAULT_FAR_TARGETS,
    pair_distances,
    template_pair_scores,
    verification_accuracy_10fold,
    verification_report,
)

from ..plotting import pyplot
from . import CommandError

PLOT_POINTS = 2_000


def add_subparser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval-verify",
        help="ROC, AUC, EER, TAR@FAR (and 10-fold accuracy) from features or pair scores",
        description=__doc__,
    )
    parser.add_argument("input", type=Path, help=".npz with scores+labels or embeddings")
    parser.add_argument("--pairs", type=Path, help="text file of lines 'i j label'")
    parser.add_argument(
        "--far",
        type=float,
        nargs="+",
        default=list(DEFAULT_FAR_TARGETS),
        help="target FARs (default: 1e-6 ... 1e-1)",
    )
    parser.add_argument("--folds", type=int, default=10, help="folds of the k-fold accuracy")
    parser.add_argument("--json", type=Path, help="write the metrics as JSON here ('-': stdout)")
    parser.add_argument("--plot", type=Path, help="write the ROC (log-scale FAR axis) as a PNG")
    parser.add_argument(
        "--bootstrap", type=int, metavar="N", help="95%% percentile intervals from N resamples"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument(
        "--distractors", type=Path, help=".npy of distractor embeddings for the 1:N curve"
    )
    parser.add_argument(
        "--distractor-plot", type=Path, help="write the identification-rate curve as a PNG"
    )
    parser.set_defaults(func=run)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise CommandError(f"{path} is not a file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise CommandError(f"{path} cannot be read as .npz: {error}") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise CommandError(f"{path} holds a single array; expected an .npz with named arrays")
    with archive:
        try:
            return {name: archive[name] for name in archive.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
            raise CommandError(f"{path} cannot be read as .npz: {error}") from error


def _read_pair_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    # Same layout as an IJB pair list: "i j label" per line, here with embedding row indices.
    if not path.is_file():
        raise CommandError(f"{path} is not a file")
    first, second, labels = read_template_pairs(path)
    return np.stack([first, second], axis=1), labels


def _scores_and_labels(arrays: dict[str, np.ndarray], pair_file: Path | None):
    """``(scores, labels, distances_of_interleaved_pairs_or_None)``."""
    if "scores" in arrays:
        if "labels" not in arrays:
            raise CommandError("an input with 'scores' needs 'labels'")
        return arrays["scores"], arrays["labels"], None
    if "embeddings" not in arrays:
        raise CommandError(
            f"the input needs 'scores' and 'labels', or 'embeddings'; found {sorted(arrays)}"
        )
    embeddings = arrays["embeddings"]
    if pair_file is not None or "pairs" in arrays:
        if pair_file is not None:
            pairs, labels = _read_pair_file(pair_file)
        elif "labels" not in arrays:
            raise CommandError("an input with 'pairs' needs 'labels'")
        else:
            pairs, labels = arrays["pairs"], arrays["labels"]
        if pairs.ndim != 2 or pairs.shape[1] != 2 or not np.issubdtype(pairs.dtype, np.integer):
            raise CommandError(f"pairs must be (n, 2) row indices, got {pairs.shape} {pairs.dtype}")
        if pairs.size and (pairs.min() < 0 or pairs.max() >= len(embeddings)):
            raise CommandError(f"pair indices must lie in [0, {len(embeddings)})")
        unit = l2_normalize(np.asarray(embeddings, dtype=np.float32))
        rows = np.arange(unit.shape[0])
        return template_pair_scores(unit, rows, pairs[:, 0], pairs[:, 1]), labels, None
    if "issame" not in arrays:
        raise CommandError("'embeddings' need 'issame' (interleaved pairs), 'pairs' or --pairs")
    distances = pair_distances(embeddings)
    return 1.0 - distances / 2.0, arrays["issame"], distances


def _with_interval(value: float, interval) -> str:
    return f"{value:.6f}" + (f" [{interval[0]:.6f}, {interval[1]:.6f}]" if interval else "")


def _table(summary: dict) -> str:
    intervals = summary.get("intervals")
    lines = [
        f"pairs: {summary['n_genuine']} genuine, {summary['n_impostor']} impostor",
        "",
        "| metric | value |",
        "|---|---|",
        f"| AUC | {_with_interval(summary['auc'], intervals and intervals['auc'])} |",
        f"| EER | {_with_interval(summary['eer'], intervals and intervals['eer'])} |",
    ]
    if "ten_fold" in summary:
        fold = summary["ten_fold"]
        lines.append(
            f"| {summary['folds']}-fold accuracy | "
            f"{fold['accuracy_mean']:.5f} ± {fold['accuracy_std']:.5f} |"
        )
        lines.append(
            f"| VAL@FAR=1e-3 | {fold['val_at_far_1e-3_mean']:.5f} ± "
            f"{fold['val_at_far_1e-3_std']:.5f} |"
        )
    lines += ["", "| FAR | TAR (nearest ROC point) | TAR (threshold) |", "|---|---|---|"]
    for position, row in enumerate(summary["tar_at_far"]):
        bounds = intervals["tar_at_far"][position] if intervals else {}
        threshold = _with_interval(row["threshold"], bounds.get("threshold"))
        lines.append(f"| {row['far']:g} | {row['nearest']:.6f} | {threshold} |")
    if intervals:
        lines.append(
            f"\n[low, high]: {100 * intervals['confidence']:g}% {intervals['method']} "
            f"({intervals['num_resamples']} resamples, seed {intervals['seed']})"
        )
    return "\n".join(lines)


def _plot(report, path: Path) -> None:
    plt = pyplot()
    positive = np.flatnonzero(report.far > 0)
    far, tar = report.far[positive], report.tar[positive]
    # A few thousand points, evenly spread on the log axis, draw the same picture as millions.
    grid = np.geomspace(far[0], 1.0, PLOT_POINTS)
    picked = np.unique(np.minimum(np.searchsorted(far, grid, side="right") - 1, far.size - 1))
    figure, axis = plt.subplots(figsize=(5, 4))
    axis.plot(far[picked], tar[picked], drawstyle="steps-post")
    if report.intervals is not None:
        band = report.intervals
        axis.fill_between(
            band.band_far,
            band.band_tar[0],
            band.band_tar[1],
            step="post",
            alpha=0.25,
            label=f"{100 * band.confidence:g}% bootstrap interval (threshold rule)",
        )
        axis.legend(loc="lower right")
    axis.set_xscale("log")
    axis.set_xlabel("FAR (false accept rate)")
    axis.set_ylabel("TAR (true accept rate)")
    axis.set_title(f"ROC  (AUC {report.auc:.4f}, EER {report.eer:.4f})")
    axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _distractor_curve(arrays: dict[str, np.ndarray], path: Path):
    from evaluation.verification import identification_with_distractors

    needed = ("probe_features", "probe_subjects", "gallery_features", "gallery_subjects")
    missing = [key for key in needed if key not in arrays]
    if missing:
        raise CommandError(f"--distractors needs the input keys {', '.join(missing)}")
    if not path.is_file():
        raise CommandError(f"{path} is not a file")
    try:
        distractors = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise CommandError(f"{path} cannot be read as .npy: {error}") from error
    return identification_with_distractors(*(arrays[key] for key in needed), distractors)


def _distractor_table(curve) -> str:
    lines = [
        f"1:N with distractors: {curve.num_mated} mated probes "
        f"({curve.num_non_mated} without a gallery mate left out)",
        "",
        "| distractors | " + " | ".join(f"rank-{k}" for k in curve.ranks) + " |",
        "|---|" + "---|" * len(curve.ranks),
    ]
    for count, row in zip(curve.distractor_counts, curve.rates, strict=True):
        lines.append(f"| {count:,} | " + " | ".join(f"{rate:.4f}" for rate in row) + " |")
    return "\n".join(lines)


def _plot_distractors(curve, path: Path) -> None:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5, 4))
    # Count 0 (the gallery alone) sits at 1 on the log axis.
    counts = np.maximum(curve.distractor_counts, 1)
    for column, k in enumerate(curve.ranks):
        axis.plot(counts, 100 * curve.rates[:, column], marker="o", label=f"rank-{k}")
    axis.set_xscale("log")
    axis.set(xlabel="distractors", ylabel="identification rate (%)", ylim=(0, 100.5))
    axis.set_title("Identification with distractors")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(args) -> int:
    arrays = _load_npz(args.input)
    summary, tables = {}, []
    pair_keys = ("scores", "embeddings")
    if args.distractors is None or any(key in arrays for key in pair_keys):
        scores, labels, distances = _scores_and_labels(arrays, args.pairs)
        report = verification_report(
            scores,
            labels,
            args.far,
            bootstrap=args.bootstrap,
            subjects=arrays.get("subjects") if args.bootstrap else None,
            seed=args.seed,
        )
        summary = report.as_dict()
        if distances is not None:
            ten_fold = verification_accuracy_10fold(
                distances=distances, issame=labels, n_folds=args.folds
            )
            summary["folds"] = args.folds
            summary["ten_fold"] = ten_fold.as_dict()
        if args.plot is not None:
            _plot(report, args.plot)
        tables.append(_table(summary))
    if args.distractors is not None:
        curve = _distractor_curve(arrays, args.distractors)
        summary["distractors"] = curve.as_dict()
        tables.append(_distractor_table(curve))
        if args.distractor_plot is not None:
            _plot_distractors(curve, args.distractor_plot)
    if args.json is not None:
        text = json.dumps(summary, indent=2)
        if str(args.json) == "-":
            print(text)
            return 0
        args.json.write_text(text + "\n")
    print("\n\n".join(tables), file=sys.stdout)
    return 0
