"""``pml-lm eval-reid FEATURES.npz``: re-ID metrics of saved query and gallery features.

The ``.npz`` file holds ``query_features`` (nq, d) and ``gallery_features`` (ng, d), or a
``distmat`` (nq, ng) instead of both, plus the integer vectors ``query_pids``,
``gallery_pids``, ``query_camids`` and ``gallery_camids``.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from ..plotting import pyplot
from . import CommandError

ID_KEYS = ("query_pids", "gallery_pids", "query_camids", "gallery_camids")
TABLE_RANKS = (1, 5, 10, 20, 50)


def add_subparser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval-reid",
        help="re-ID CMC / mAP / mINP of a features file",
        description=__doc__.splitlines()[0].split(": ", 1)[1],
    )
    parser.add_argument("features", type=Path, help="the .npz file (keys: see the docs)")
    parser.add_argument("--metric", choices=("euclidean", "cosine"), default="euclidean")
    parser.add_argument("--max-rank", type=int, default=50)
    parser.add_argument("--protocol", choices=("market1501", "cuhk03"), default="market1501")
    parser.add_argument("--seed", type=int, default=0, help="CUHK03 sampling seed")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--json", type=Path, help="write the metrics to this JSON file")
    parser.add_argument("--plot", type=Path, help="write the CMC curve to this PNG file")
    parser.add_argument(
        "--rerank",
        nargs="?",
        const="paper",
        choices=("paper", "torchreid"),
        help="k-reciprocal re-ranking, k1=20 k2=6 lambda=0.3 (convention: paper, the default, "
        "or torchreid); needs features",
    )
    parser.add_argument(
        "--query-expansion",
        choices=("average", "alpha"),
        help="fast-reid's query expansion (k=5; alpha: weights cos^3); needs features",
    )
    parser.add_argument(
        "--bootstrap", type=int, metavar="N", help="95%% intervals from N identity resamples"
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    from evaluation.reid import evaluate_reid, evaluate_reid_from_distances

    arrays = _load(args.features)
    ids = [arrays[key] for key in ID_KEYS]
    options = {
        "max_rank": args.max_rank,
        "protocol": args.protocol,
        "seed": args.seed,
        "bootstrap": args.bootstrap,
    }
    if "distmat" in arrays:
        if args.rerank or args.query_expansion:
            raise CommandError("--rerank and --query-expansion need features, not a distmat")
        result = evaluate_reid_from_distances(arrays["distmat"], *ids, **options)
    else:
        result = evaluate_reid(
            arrays["query_features"],
            arrays["gallery_features"],
            *ids,
            metric=args.metric,
            device=args.device,
            rerank={"convention": args.rerank} if args.rerank else None,
            query_expansion=args.query_expansion,
            **options,
        )
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    if args.plot:
        plot_cmc(result.cmc, args.plot, result.intervals)
    return 0


def _load(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise CommandError(f"cannot read {path} as an .npz file: {error}") from None
    needed = list(ID_KEYS)
    if "distmat" not in arrays:
        needed += ["query_features", "gallery_features"]
    missing = [key for key in needed if key not in arrays]
    if missing:
        raise CommandError(f"{path} lacks the keys {', '.join(missing)}")
    return arrays


def format_table(result) -> str:
    intervals = result.intervals
    rows = [("mAP", result.mAP, intervals and (intervals.mAP_low, intervals.mAP_high))]
    rows.append(("mINP", result.mINP, intervals and (intervals.mINP_low, intervals.mINP_high)))
    rows += [
        (f"Rank-{k}", result.cmc[k - 1], intervals and intervals.rank(k))
        for k in TABLE_RANKS
        if k <= len(result.cmc)
    ]
    lines = ["| metric | value |", "|---|---|"]
    for name, value, interval in rows:
        bounds = f" [{100 * interval[0]:.2f}, {100 * interval[1]:.2f}]" if interval else ""
        lines.append(f"| {name} | {100 * value:.2f}%{bounds} |")
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


def plot_cmc(cmc: np.ndarray, path: Path, intervals=None) -> None:
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
        axes.legend(loc="lower right")
    axes.set(xlabel="rank", ylabel="matching rate (%)", title="CMC", ylim=(0, 100.5))
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
