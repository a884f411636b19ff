"""``pml-lm demo``: every margin loss on scikit-learn's digits, margins and evaluation in one go."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import CommandError, check_output_dir

# The reduced run used by the tests: fewer epochs and seeds, same methods and measurements.
QUICK_EPOCHS = 12
QUICK_SEEDS = 2


def add_subparser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train every margin loss on the bundled digits data and measure margins",
        description=(
            "Trains an MLP embedding on scikit-learn's handwritten digits with each loss of the "
            "table (balanced and long-tailed), then reports accuracy, class and sample margins "
            "against their bounds, re-ID mAP / rank-1 and verification EER / TAR@FAR."
        ),
    )
    parser.add_argument("--output-dir", type=Path, default=Path("pml-lm-output"))
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 60)")
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_EPOCHS} epochs, {QUICK_SEEDS} seeds"
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    parser.set_defaults(func=run)


def _positive(value: int | None, default: int, name: str) -> int:
    if value is None:
        return default
    if value < 1:
        raise CommandError(f"--{name} must be at least 1, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    import torch

    from ..demo.data import load_digits_split
    from ..demo.methods import ALL_METHODS, SAMPLE_MARGIN_WEIGHT, SCALE, ZERO_CENTROID_WEIGHT
    from ..demo.report import bounds_line, markdown_table, summarize, write_json
    from ..demo.run import run_all
    from ..training.trainer import Schedule

    epochs = _positive(args.epochs, QUICK_EPOCHS if args.quick else Schedule.epochs, "epochs")
    seeds = list(range(_positive(args.seeds, QUICK_SEEDS if args.quick else 3, "seeds")))
    output_dir: Path = args.output_dir
    check_output_dir(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    schedule = Schedule(epochs=epochs)
    split = load_digits_split()
    # The MLP's matrices are tiny: a second intra-op thread only adds synchronisation.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = run_all(ALL_METHODS, split, schedule, seeds)
    finally:
        torch.set_num_threads(threads)
    summary = summarize(results)
    config = {
        "data": "sklearn load_digits, 50 test images per class, the rest for training",
        "network": "MLP 64-128-128-32, ReLU",
        "schedule": schedule.as_dict(),
        "scale": SCALE,
        "sample_margin_weight": SAMPLE_MARGIN_WEIGHT,
        "zero_centroid_weight_mean_form": ZERO_CENTROID_WEIGHT,
        "seeds": seeds,
        "quick": bool(args.quick),
    }
    figures = []
    if not args.no_plots:
        from ..demo.plots import write_figures

        figures = write_figures(summary, results, output_dir)
    config["seconds"] = round(time.perf_counter() - started, 1)
    write_json(output_dir / "results.json", summary, config)
    print()
    print(markdown_table(summary))
    print(bounds_line(summary))
    print(
        f"\n{len(results)} runs in {config['seconds']} s; results in {output_dir / 'results.json'}"
    )
    for path in figures:
        print(f"figure: {path}")
    return 0
