"""``pml-lm eval-reid FEATURES.npz``: re-ID metrics of saved query and gallery features."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from evaluation.defaults import (
    CONVENTIONS,
    DEFAULT_MAX_RANK,
    DEFAULT_PROTOCOL,
    DEFAULT_SEED,
    METRICS,
    NAMED_EXPANSIONS,
    PROTOCOLS,
)

from . import (
    CommandError,
    check_device,
    check_output_file,
    load_npz,
    refuse_options,
    write_json,
)
from .environment import environment_record
from .tables import markdown_table, percent

if TYPE_CHECKING:
    from collections.abc import Sequence

    from evaluation.reid import ReIDResult
    from evaluation.reid.bootstrap import ReIDIntervals


ID_KEYS = ("query_pids", "gallery_pids", "query_camids", "gallery_camids")
TABLE_RANKS = (1, 5, 10, 20, 50)
# Cosine, as ``pml-lm train`` and the docs use: the margin losses learn directions.
DEFAULT_METRIC = "cosine"

DESCRIPTION = """\
Re-ID CMC, mAP and mINP of saved query and gallery features (rates in percent in the table,
fractions in the JSON).

FEATURES.npz holds query_features (nq, d) and gallery_features (ng, d), or a distance
matrix distmat (nq, ng) instead of both, plus the integer vectors query_pids, gallery_pids,
query_camids and gallery_camids (what pml-lm embed writes for a re-ID layout).
"""


def add_subparser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval-reid", help="re-ID CMC / mAP / mINP of a features file", description=DESCRIPTION
    )
    parser.add_argument("features", type=Path, help="the .npz file (keys above)")
    parser.add_argument(
        "--metric",
        choices=METRICS,
        default=None,
        help=f"distance of the features (default: {DEFAULT_METRIC}); not with a distmat",
    )
    parser.add_argument(
        "--max-rank", type=int, default=DEFAULT_MAX_RANK, help="length of the CMC curve"
    )
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default=DEFAULT_PROTOCOL,
        help="market1501 (also Duke, MSMT17) or CUHK03 single-shot",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help=f"seed of the CUHK03 sampling and of --bootstrap (default: {DEFAULT_SEED})",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="torch device: cpu, cuda, cuda:N (default: cuda if available); not with a distmat",
    )
    parser.add_argument("--json", type=Path, help="write the metrics to this JSON file")
    parser.add_argument("--plot", type=Path, help="write the CMC curve to this PNG file")
    parser.add_argument(
        "--rerank",
        nargs="?",
        const="paper",
        choices=CONVENTIONS,
        help="k-reciprocal re-ranking, k1=20 k2=6 lambda=0.3; convention paper (the default: "
        "the metric's distance as the authors' code normalises it) or torchreid (that distance "
        "squared once more, as torchreid does); needs features",
    )
    parser.add_argument(
        "--query-expansion",
        choices=NAMED_EXPANSIONS,
        help="fast-reid's query expansion (k=5; alpha: weights cos^3); needs features",
    )
    parser.add_argument(
        "--bootstrap", type=int, metavar="N", help="95%% intervals from N identity resamples"
    )
    parser.set_defaults(func=run)


def _check_options(args: argparse.Namespace, arrays: dict) -> None:
    if "distmat" in arrays:
        refuse_options(
            args,
            ("--metric", "--device", "--rerank", "--query-expansion"),
            f"need features; {args.features} holds a distmat",
        )
    if args.seed is not None and args.protocol != "cuhk03" and args.bootstrap is None:
        raise CommandError("--seed applies to --protocol cuhk03 and to --bootstrap only")


def run(args: argparse.Namespace) -> int:
    device = check_device(args.device)
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None:
            check_output_file(path, option)
    arrays = load_npz(args.features)
    needed = list(ID_KEYS)
    if "distmat" not in arrays:
        needed += ["query_features", "gallery_features"]
    missing = [key for key in needed if key not in arrays]
    if missing:
        raise CommandError(f"{args.features} lacks the keys {', '.join(missing)}")
    _check_options(args, arrays)

    from evaluation.reid import evaluate_reid, evaluate_reid_from_distances

    ids = [arrays[key] for key in ID_KEYS]
    options = {
        "max_rank": args.max_rank,
        "protocol": args.protocol,
        "seed": DEFAULT_SEED if args.seed is None else args.seed,
        "bootstrap": args.bootstrap,
    }
    if "distmat" in arrays:
        device = "cpu"  # the protocol itself runs on the CPU
        result = evaluate_reid_from_distances(arrays["distmat"], *ids, **options)
    else:
        device = device or _automatic_device()
        result = evaluate_reid(
            arrays["query_features"],
            arrays["gallery_features"],
            *ids,
            metric=args.metric or DEFAULT_METRIC,
            device=device,
            rerank={"convention": args.rerank} if args.rerank else None,
            query_expansion=args.query_expansion,
            **options,
        )
    print(format_table(result))
    if args.json:
        record = {**result.as_dict(), "metric": args.metric or DEFAULT_METRIC}
        if "distmat" in arrays:
            record["metric"] = "distmat"
        write_json(args.json, {**record, "environment": environment_record(device)})
    if args.plot:
        plot_cmc(result.cmc, args.plot, result.intervals)
    return 0


def _automatic_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def format_table(result: ReIDResult) -> str:
    """The metrics as a markdown table, rates in percent."""
    intervals = result.intervals
    rows = [("mAP", result.mAP, intervals and (intervals.mAP_low, intervals.mAP_high))]
    rows.append(("mINP", result.mINP, intervals and (intervals.mINP_low, intervals.mINP_high)))
    rows += [
        (f"Rank-{k}", result.cmc[k - 1], intervals and intervals.rank(k))
        for k in TABLE_RANKS
        if k <= len(result.cmc)
    ]
    table = markdown_table(
        ["metric", "%"], [(name, percent(value, 2, interval)) for name, value, interval in rows]
    )
    lines = [table]
    if intervals:
        lines.append(
            f"\n[low, high]: {100 * intervals.confidence:g}% percentile bootstrap over query "
            f"identities ({intervals.num_resamples} resamples, seed {intervals.seed})"
        )
    lines.append(
        f"\nvalid queries: {result.num_valid_queries}, "
        f"skipped (no positive): {result.num_skipped_queries}"
    )
    return "\n".join(lines)


def plot_cmc(cmc: Sequence[float], path: Path, intervals: ReIDIntervals | None = None) -> None:
    import numpy as np

    from ..plotting import pyplot

    plt = pyplot()
    figure, axes = plt.subplots(figsize=(5, 4))
    ranks = np.arange(1, len(cmc) + 1)
    axes.plot(ranks, 100 * cmc, marker=".")
    if intervals is not None:
        axes.fill_between(
            ranks,
            100 * intervals.cmc_low,
            100 * intervals.cmc_high,
            alpha=0.25,
            label=f"{100 * intervals.confidence:g}% bootstrap interval",
        )
        axes.legend(loc="best")
    axes.set(xlabel="rank", ylabel="matching rate (%)", title="CMC", ylim=(0, 100.5))
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
