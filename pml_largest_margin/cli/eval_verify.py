"""``pml-lm eval-verify``: 1:1 verification metrics from saved features or scores."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evaluation.defaults import DEFAULT_FAR_TARGETS, DEFAULT_NUM_FOLDS, DEFAULT_SEED

from . import CommandError, check_output_file, load_npz, refuse_options, write_json
from .environment import environment_record
from .tables import NOT_MEASURABLE, markdown_table, percent, short_number

PLOT_POINTS = 2_000
DEFAULT_FAR_HELP = " ".join(short_number(far) for far in DEFAULT_FAR_TARGETS)

DESCRIPTION = """\
1:1 verification metrics (rates in percent in the table, fractions in the JSON).

INPUT is an .npz file (read without pickles) holding one of:
  scores and labels          one score per pair (larger = more similar), label 1 for genuine;
  embeddings (2n, d), issame interleaved pairs as in a .bin set; adds the k-fold accuracy;
  embeddings, pairs, labels  pairs (n, 2) are row indices; or embeddings alone with --pairs,
                             a text file of lines "i j label".
Embeddings are scored by cosine similarity. A TAR at a FAR below 1 / (number of impostor
pairs) cannot be measured and is reported so. --bootstrap N adds percentile intervals,
resampling the subjects of an optional subjects array (one id per pair), else the pairs.
--distractors FILE (a .npy of distractor embeddings, memory-mapped) adds the rank-k
identification curve of probe_features / probe_subjects against gallery_features /
gallery_subjects (in the .npz) as distractors are added.
"""


def add_subparser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval-verify",
        help="ROC, AUC, EER, TAR@FAR (and 10-fold accuracy) from features or pair scores",
        description=DESCRIPTION,
    )
    parser.add_argument("input", type=Path, help=".npz with scores+labels or embeddings")
    parser.add_argument(
        "--pairs", type=Path, help="text file of lines 'i j label' (embeddings-only input)"
    )
    parser.add_argument(
        "--far",
        type=float,
        nargs="+",
        default=None,
        help=f"target FARs, fractions (default: {DEFAULT_FAR_HELP})",
    )
    parser.add_argument(
        "--folds",
        type=int,
        default=None,
        help=f"folds of the k-fold accuracy, interleaved input only (default: {DEFAULT_NUM_FOLDS})",
    )
    parser.add_argument("--json", type=Path, help="write the metrics as JSON here ('-': stdout)")
    parser.add_argument("--plot", type=Path, help="write the ROC (log-scale FAR axis) as a PNG")
    parser.add_argument(
        "--bootstrap", type=int, metavar="N", help="95%% percentile intervals from N resamples"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help=f"seed of --bootstrap (default: {DEFAULT_SEED})"
    )
    parser.add_argument(
        "--distractors", type=Path, help=".npy of distractor embeddings for the 1:N curve"
    )
    parser.add_argument(
        "--distractor-plot",
        type=Path,
        help="write the identification-rate curve as a PNG (with --distractors)",
    )
    parser.set_defaults(func=run)


def _check_options(args: argparse.Namespace, arrays: dict) -> bool:
    """Refuse options that this input would ignore; returns whether to score pairs (False for
    an input that holds only the arrays of the 1:N curve)."""
    has_pairs = "scores" in arrays or "embeddings" in arrays
    if args.distractor_plot is not None and args.distractors is None:
        raise CommandError("--distractor-plot needs --distractors")
    if args.seed is not None and args.bootstrap is None:
        raise CommandError("--seed applies to --bootstrap only")
    if not has_pairs and args.distractors is not None:
        refuse_options(
            args,
            ("--pairs", "--far", "--folds", "--plot", "--bootstrap"),
            f"need pairs; {args.input} holds only the 1:N arrays",
        )
        return False
    if args.pairs is not None:
        found = [key for key in ("scores", "issame", "pairs") if key in arrays]
        if found:
            raise CommandError(f"--pairs is not used: {args.input} already holds {found[0]!r}")
    interleaved = "scores" not in arrays and "issame" in arrays and args.pairs is None
    interleaved = interleaved and "pairs" not in arrays
    if args.folds is not None and not interleaved:
        raise CommandError("--folds applies to interleaved embeddings with 'issame' only")
    return True


def _read_pair_file(path: Path):
    import numpy as np

    from evaluation.datasets.face import read_template_pairs

    # Same layout as an IJB pair list: "i j label" per line, here with embedding row indices.
    if not path.is_file():
        raise CommandError(f"{path} is not a file")
    first, second, labels = read_template_pairs(path)
    return np.stack([first, second], axis=1), labels


def _scores_and_labels(arrays: dict, pair_file: Path | None):
    """``(scores, labels, distances_of_interleaved_pairs_or_None)``."""
    import numpy as np

    from evaluation.knn import l2_normalize
    from evaluation.verification import pair_distances, template_pair_scores

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


def mark_unmeasurable(summary: dict) -> None:
    """Replace, in ``summary`` (``VerificationReport.as_dict()``), each TAR at a FAR target
    below ``1 / num_impostor`` by ``None`` with ``"measurable": False`` and the reason.

    With N impostor pairs the smallest non-zero FAR is 1/N, so a lower target can only be met
    at FAR 0: the number read there does not measure the TAR at that target.
    """
    num_impostor = summary["num_impostor"]
    intervals = summary.get("intervals")
    for position, row in enumerate(summary["tar_at_far"]):
        row["measurable"] = row["far"] * num_impostor >= 1
        if row["measurable"]:
            continue
        row["nearest"] = row["threshold"] = None
        row["reason"] = (
            f"FAR {row['far']:g} is below 1/{num_impostor} (one false accept among "
            f"{num_impostor} impostor pairs)"
        )
        if intervals:
            intervals["tar_at_far"][position] = dict.fromkeys(intervals["tar_at_far"][position])


def _table(summary: dict) -> str:
    intervals = summary.get("intervals")
    rows = [
        ("AUC", percent(summary["auc"], 3, intervals and intervals["auc"])),
        ("EER", percent(summary["eer"], 3, intervals and intervals["eer"])),
    ]
    if "ten_fold" in summary:
        fold = summary["ten_fold"]
        rows.append(
            (
                f"{summary['folds']}-fold accuracy",
                f"{percent(fold['accuracy_mean'], 3)} ± {percent(fold['accuracy_std'], 3)}",
            )
        )
        rows.append(
            (
                "VAL@FAR=1e-3",
                f"{percent(fold['val_at_far_1e-3_mean'], 3)} ± "
                f"{percent(fold['val_at_far_1e-3_std'], 3)}",
            )
        )
    far_rows = []
    for position, row in enumerate(summary["tar_at_far"]):
        if not row["measurable"]:
            far_rows.append((f"{row['far']:g}", NOT_MEASURABLE, NOT_MEASURABLE))
            continue
        bounds = intervals["tar_at_far"][position] if intervals else {}
        threshold = bounds.get("threshold")
        # The threshold rule's TAR interval is what the bootstrap gives, next to its TAR.
        far_rows.append(
            (
                f"{row['far']:g}",
                percent(row["nearest"], 3),
                percent(row["threshold"], 3, threshold),
            )
        )
    num_impostor = summary["num_impostor"]
    lines = [
        f"pairs: {summary['num_genuine']} genuine, {num_impostor} impostor "
        f"(smallest measurable FAR: 1/{num_impostor} = {1 / num_impostor:.3g})",
        "",
        markdown_table(["metric", "%"], rows),
        "",
        markdown_table(["FAR", "TAR % (nearest ROC point)", "TAR % (threshold rule)"], far_rows),
    ]
    if intervals:
        lines.append(
            f"\n[low, high]: {100 * intervals['confidence']:g}% {intervals['method']} "
            f"({intervals['num_resamples']} resamples, seed {intervals['seed']})"
        )
    return "\n".join(lines)


def _plot(report, path: Path) -> None:
    import numpy as np

    from ..plotting import pyplot

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
        axis.legend(loc="best")
    axis.set_xscale("log")
    axis.set_xlabel("FAR (false accept rate)")
    axis.set_ylabel("TAR (true accept rate)")
    axis.set_title(f"ROC  (AUC {report.auc:.4f}, EER {report.eer:.4f})")
    axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _distractor_curve(arrays: dict, path: Path):
    import numpy as np

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
    header = ["distractors", *(f"rank-{k} %" for k in curve.ranks)]
    rows = [
        (f"{count:,}", *(percent(rate, 2) for rate in row))
        for count, row in zip(curve.distractor_counts, curve.rates, strict=True)
    ]
    return (
        f"1:N with distractors: {curve.num_mated} mated probes "
        f"({curve.num_non_mated} without a gallery mate left out)\n\n"
        + markdown_table(header, rows)
    )


def _plot_distractors(curve, path: Path) -> None:
    import numpy as np

    from ..plotting import pyplot

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
    axis.legend(loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(args: argparse.Namespace) -> int:
    for option, path in (
        ("--json", args.json),
        ("--plot", args.plot),
        ("--distractor-plot", args.distractor_plot),
    ):
        if path is not None and str(path) != "-":
            check_output_file(path, option)
    arrays = load_npz(args.input)
    score_pairs = _check_options(args, arrays)

    from evaluation.verification import verification_accuracy_10fold, verification_report

    summary, tables = {}, []
    if score_pairs:
        scores, labels, distances = _scores_and_labels(arrays, args.pairs)
        report = verification_report(
            scores,
            labels,
            DEFAULT_FAR_TARGETS if args.far is None else args.far,
            bootstrap=args.bootstrap,
            subjects=arrays.get("subjects") if args.bootstrap else None,
            seed=DEFAULT_SEED if args.seed is None else args.seed,
        )
        summary = report.as_dict()
        mark_unmeasurable(summary)
        if distances is not None:
            folds = DEFAULT_NUM_FOLDS if args.folds is None else args.folds
            ten_fold = verification_accuracy_10fold(
                distances=distances, issame=labels, num_folds=folds
            )
            summary["folds"] = folds
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
        write_json(args.json, {**summary, "environment": environment_record("cpu")})
        if str(args.json) == "-":
            return 0
    print("\n\n".join(tables), file=sys.stdout)
    return 0
