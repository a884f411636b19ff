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
    parser.set_defaults(func=run)


def run(args) -> int:
    from evaluation.reid import evaluate_reid, evaluate_reid_from_distances

    arrays = _load(args.features)
    ids = [arrays[key] for key in ID_KEYS]
    options = {"max_rank": args.max_rank, "protocol": args.protocol, "seed": args.seed}
    if "distmat" in arrays:
        result = evaluate_reid_from_distances(arrays["distmat"], *ids, **options)
    else:
        result = evaluate_reid(
            arrays["query_features"],
            arrays["gallery_features"],
            *ids,
            metric=args.metric,
            device=args.device,
            **options,
        )
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    if args.plot:
        plot_cmc(result.cmc, args.plot)
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
    rows = [("mAP", result.mAP), ("mINP", result.mINP)]
    rows += [(f"Rank-{k}", result.cmc[k - 1]) for k in TABLE_RANKS if k <= len(result.cmc)]
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {name} | {100 * value:.2f}% |" for name, value in rows]
    lines.append(
        f"\nvalid queries: {result.num_valid_queries}, "
        f"skipped (no positive): {result.num_skipped_queries}"
    )
    return "\n".join(lines)


def plot_cmc(cmc: np.ndarray, path: Path) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(5, 4))
    axes.plot(np.arange(1, len(cmc) + 1), 100 * cmc, marker=".")
    axes.set(xlabel="rank", ylabel="matching rate (%)", title="CMC", ylim=(0, 100.5))
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
