"""``pml-lm train``: train on your own images with a largest-margin loss, then evaluate.

Every option may also come from ``--config FILE`` (TOML, or YAML with PyYAML), whose keys are
the options' names (``batch-size`` or ``batch_size``); the command line wins over the file,
the file over the defaults. The effective options are written to ``config.toml`` in the output
folder, which ``--config`` reads back.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ..training.loss_registry import (
    LOSS_NAMES,
    LOSSES,
    check_loss_options,
    check_sub_centers,
    loss_spec,
)
from ..training.options import (
    DEFAULT_DEVICE,
    DEFAULT_WORKERS,
    LAYOUTS,
    TrainOptions,
    default_best_metric,
)
from ..training.recipes import PACKAGE_RECIPE, RECIPES
from ..training.schedule import ADAPTIVE_OPTIMIZER_LR, LR_SCHEDULES, OPTIMIZERS, Schedule
from . import CommandError

DEFAULT_OUTPUT_DIR = Path("pml-lm-train")
DEFAULT_HELD_OUT = TrainOptions.__dataclass_fields__["held_out_fraction"].default
# Options that say what to do with the output folder, not what the run is: not config keys.
_NOT_IN_CONFIG = ("config", "resume", "overwrite")


def _margin_help() -> str:
    parts = [
        f"{spec.name} {spec.margin.default:g} in {spec.margin.describe_range()}"
        for spec in LOSSES
        if spec.margin is not None
    ]
    return (
        "the loss's margin, in the unit of this package's classes (angular margins in radians, "
        "ArcFace's too; cosine margins subtracted from the cosine; SphereFace's integer m); "
        f"default and valid range: {'; '.join(parts)}; refused for the other losses"
    )


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    package, schedule = PACKAGE_RECIPE, PACKAGE_RECIPE.schedule
    defaults = TrainOptions.__dataclass_fields__
    no_scale = ", ".join(spec.name for spec in LOSSES if not spec.takes_scale)
    add = parser.add_argument
    # Every default is None here: "not given", so that --config and the recipe can fill it in.
    add("data", nargs="?", help="dataset folder (or `data` in --config)")
    add("--config", type=Path, metavar="FILE", help="options from a .toml or .yaml file")
    add("--layout", choices=LAYOUTS, help="dataset layout (default: auto, detected)")
    add(
        "--backbone",
        help=f"{defaults['backbone'].default} (built in, the default) or a torchvision model such "
        'as resnet18 (extra "train")',
    )
    add("--pretrained", action="store_true", default=None, help="torchvision's weights")
    add("--loss", choices=LOSS_NAMES, help=f"default: {defaults['loss'].default}")
    add(
        "--recipe",
        choices=sorted(RECIPES),
        help="defaults for the options below left out: this package's (package, the default), "
        "or the authors' training script's (paper); see docs/monitor.md",
    )
    add(
        "--scale",
        type=float,
        help=f"s of the losses that have one (default: the recipe's, {package.scale:g} for "
        f"package; PML's 1 for sphereface); refused for {no_scale}",
    )
    add("--margin", type=float, help=_margin_help())
    with_sub_centers = ", ".join(spec.name for spec in LOSSES if spec.takes_sub_centers)
    add(
        "--sub-centers",
        type=int,
        metavar="K",
        help=f"K prototypes per class, a class's cosine the best of its K (PML's "
        f"SubCenterArcFaceLoss layout; default 1); for {with_sub_centers}",
    )
    add("--sample-margin-weight", type=float, help="λ of R_sm (default: the recipe's, 0)")
    add(
        "--zero-centroid-weight",
        type=float,
        help="λ of R_w (mean form; the sum form under --recipe paper; default: the recipe's)",
    )
    add(
        "--fixed-prototypes",
        metavar="FILE.npy",
        help="train against these frozen prototypes (embedding_size, num_classes); "
        "see pml-lm prototypes",
    )
    add("--embedding-size", type=int, help=f"default: {defaults['embedding_size'].default}")
    add("--image-size", help="N or HxW (default: 64; 256x128 for a re-ID layout)")
    add("--epochs", type=int, help=f"default: the recipe's, {schedule.epochs} for package")
    add("--batch-size", type=int, help=f"default: the recipe's, {schedule.batch_size} for package")
    add(
        "--lr",
        type=float,
        help=f"learning rate (default: the recipe's, {schedule.lr:g} for package; "
        f"{ADAPTIVE_OPTIMIZER_LR:g} for adam and adamw)",
    )
    add("--optimizer", choices=OPTIMIZERS, help=f"default: {Schedule.optimizer}")
    add(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        help=f"per iteration (default: {Schedule.lr_schedule}); step: x0.1 at 1/2 and 3/4 of "
        "the epochs",
    )
    add(
        "--warmup-epochs",
        type=int,
        help=f"linear warm-up to --lr over these epochs (default: {Schedule.warmup_epochs})",
    )
    add(
        "--held-out",
        type=float,
        help=f"held-out share per class of an image folder (default: {DEFAULT_HELD_OUT:g})",
    )
    add("--seed", type=int, help=f"default: {defaults['seed'].default}")
    add(
        "--eval-every",
        type=int,
        metavar="N",
        help=f"evaluate every N epochs and after the last (0: after the last only; default: "
        f"{defaults['eval_every'].default})",
    )
    add(
        "--best-metric",
        help="metric that picks best.pt (default: accuracy for an image folder, mAP for re-ID; "
        "eer is minimised, the others maximised)",
    )
    add("--output-dir", type=Path, help=f"default: {DEFAULT_OUTPUT_DIR}")
    add("--resume", action="store_true", help="go on from OUTPUT_DIR's last.pt")
    add("--overwrite", action="store_true", help="replace the run in OUTPUT_DIR")
    add("--device", help=f"{DEFAULT_DEVICE} (CUDA when present; the default), cpu, cuda")
    add("--workers", type=int, help=f"data-loading processes (default: {DEFAULT_WORKERS})")


def add_subparser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train an embedding network on an image folder or a Market-1501 dataset",
        description=(
            "DATA is a folder with one sub-folder of images per class (a share is held out for "
            "accuracy, margins, retrieval and verification), or a re-ID dataset: Market-1501 / "
            "DukeMTMC-reID folders (bounding_box_train, query, bounding_box_test) or MSMT17 list "
            "files, evaluated by CMC / mAP / mINP on query against gallery. Writes last.pt, "
            "best.pt, history.csv/json, train.log, config.toml and metrics.json into OUTPUT_DIR."
        ),
    )
    _add_arguments(parser)
    parser.set_defaults(func=run)


def _standalone_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pml-lm train", exit_on_error=False)
    _add_arguments(parser)
    return parser


def _read_config_file(path: Path) -> dict:
    if not path.is_file():
        raise CommandError(f"--config {path} is not a file")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise CommandError(
                    "reading TOML on Python 3.10 needs tomli: python3 -m pip install tomli"
                ) from None
        try:
            with path.open("rb") as handle:
                return tomllib.load(handle)
        except tomllib.TOMLDecodeError as error:
            raise CommandError(f"--config {path}: {error}") from None
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise CommandError(
                f"--config {path}: reading YAML needs PyYAML (python3 -m pip install pyyaml); "
                "or write the file as TOML"
            ) from None
        try:
            content = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise CommandError(f"--config {path}: {error}") from None
        if not isinstance(content, dict):
            raise CommandError(f"--config {path} must hold a mapping of option names to values")
        return content
    raise CommandError(f"--config {path}: expected a .toml, .yaml or .yml file")


def _config_values(path: Path) -> dict:
    """The options of ``path``, converted and checked as the command line would be."""
    content = _read_config_file(path)
    parser = _standalone_parser()
    known = [key for key in vars(parser.parse_args([])) if key not in _NOT_IN_CONFIG]
    tokens: list[str] = []
    for raw_key, value in content.items():
        key = str(raw_key).replace("-", "_")
        if key not in known:
            raise CommandError(
                f"--config {path}: unknown key {raw_key!r}; the keys are "
                f"{', '.join(name.replace('_', '-') for name in known)}"
            )
        if isinstance(value, (dict, list)) or value is None:
            raise CommandError(f"--config {path}: {raw_key} must be a single value")
        if key == "data":
            tokens += ["--", str(value)]
            continue
        flag = f"--{key.replace('_', '-')}"
        if key == "pretrained":
            if not isinstance(value, bool):
                raise CommandError(f"--config {path}: {raw_key} must be true or false")
            tokens += [flag] if value else []
        else:
            tokens += [flag, str(value)]
    # "--" goes last: what follows it is the positional DATA.
    if "--" in tokens:
        at = tokens.index("--")
        tokens = tokens[:at] + tokens[at + 2 :] + tokens[at : at + 2]
    try:
        values = vars(parser.parse_args(tokens))
    except argparse.ArgumentError as error:
        raise CommandError(f"--config {path}: {error}") from None
    return {key: value for key, value in values.items() if value is not None}


def _merged(args: argparse.Namespace) -> argparse.Namespace:
    """The command line over ``--config`` over nothing (None: the default applies)."""
    merged = argparse.Namespace(**vars(args))
    if args.config is not None:
        for key, value in _config_values(args.config).items():
            if getattr(args, key, None) is None:
                setattr(merged, key, value)
    if merged.data is None:
        raise CommandError("DATA is missing: give it on the command line or as data in --config")
    return merged


def _given(value, default):
    return default if value is None else value


def _resolved_layout(args: argparse.Namespace) -> str:
    layout = _given(args.layout, "auto")
    if layout != "auto":
        return layout
    from ..training.market_layout import detect_reid_layout

    root = Path(args.data)
    return (root.is_dir() and detect_reid_layout(root)) or "image-folder"


def _options(args: argparse.Namespace) -> TrainOptions:
    """TrainOptions from the parsed (and merged) arguments: left-out options from the recipe
    and the dataclasses' defaults. Raises CommandError for options that do not apply."""
    from ..training.recipes import get_recipe

    defaults = TrainOptions(data=args.data)
    embedding_size = _given(args.embedding_size, defaults.embedding_size)
    workers = _given(getattr(args, "workers", None), DEFAULT_WORKERS)
    if embedding_size < 1 or workers < 0:
        raise CommandError("--embedding-size must be at least 1 and --workers at least 0")
    seed = _given(args.seed, defaults.seed)
    if seed < 0:
        raise CommandError(f"--seed must be at least 0, got {seed}")
    loss = _given(args.loss, defaults.loss)
    recipe = get_recipe(_given(args.recipe, defaults.recipe))
    spec = loss_spec(loss)
    check_loss_options(loss, args.scale, args.margin)
    sub_centers = _given(getattr(args, "sub_centers", None), defaults.sub_centers)
    check_sub_centers(loss, sub_centers)
    if sub_centers > 1 and args.fixed_prototypes is not None:
        raise CommandError("--fixed-prototypes holds one prototype per class: no --sub-centers")
    scale = None
    if spec.takes_scale:
        scale = _given(args.scale, _given(spec.default_scale, recipe.scale))
    layout = _resolved_layout(args)
    if layout != "image-folder" and args.held_out is not None:
        raise CommandError(f"--held-out applies to image folders, not to a {layout} layout")
    optimizer = _given(args.optimizer, Schedule.optimizer)
    default_lr = recipe.schedule.lr if optimizer == "sgd" else ADAPTIVE_OPTIMIZER_LR
    schedule = Schedule(
        **{
            **recipe.schedule.as_dict(),
            "epochs": _given(args.epochs, recipe.schedule.epochs),
            "batch_size": _given(args.batch_size, recipe.schedule.batch_size),
            "lr": _given(args.lr, default_lr),
            "optimizer": optimizer,
            "lr_schedule": _given(args.lr_schedule, recipe.schedule.lr_schedule),
            "warmup_epochs": _given(args.warmup_epochs, recipe.schedule.warmup_epochs),
        }
    )
    image_size = None
    if args.image_size is not None:
        from ..training.image_dataset import parse_image_size

        image_size = parse_image_size(args.image_size)
    return TrainOptions(
        data=args.data,
        layout=layout,
        backbone=_given(args.backbone, defaults.backbone),
        pretrained=bool(args.pretrained),
        loss=loss,
        scale=scale,
        margin=_given(args.margin, recipe.margin(loss)),
        sub_centers=sub_centers,
        sample_margin_weight=_given(args.sample_margin_weight, recipe.sample_margin_weight),
        zero_centroid_weight=_given(args.zero_centroid_weight, recipe.zero_centroid_weight),
        zero_centroid_form=recipe.zero_centroid_form,
        fixed_prototypes=args.fixed_prototypes,
        recipe=recipe.name,
        embedding_size=embedding_size,
        image_size=image_size,
        held_out_fraction=_given(args.held_out, DEFAULT_HELD_OUT),
        seed=seed,
        schedule=schedule,
        eval_every=_given(args.eval_every, defaults.eval_every),
        best_metric=_given(args.best_metric, default_best_metric(layout)),
    )


def _toml_value(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"cannot write {value} to TOML")
    # JSON's strings, integers, floats and booleans are TOML's too.
    return json.dumps(str(value) if isinstance(value, Path) else value, ensure_ascii=False)


def effective_config(options: TrainOptions, args: argparse.Namespace) -> str:
    """The options of a run as ``--config`` reads them: one ``key = value`` line each."""
    schedule = options.schedule
    values = {
        "data": options.data,
        "layout": options.layout,
        "backbone": options.backbone,
        "pretrained": options.pretrained,
        "loss": options.loss,
        "recipe": options.recipe,
        "scale": options.scale,
        "margin": options.margin,
        "sub_centers": options.sub_centers,
        "sample_margin_weight": options.sample_margin_weight,
        "zero_centroid_weight": options.zero_centroid_weight,
        "fixed_prototypes": options.fixed_prototypes,
        "embedding_size": options.embedding_size,
        "image_size": "x".join(map(str, options.image_size)) if options.image_size else None,
        "epochs": schedule.epochs,
        "batch_size": schedule.batch_size,
        "lr": schedule.lr,
        "optimizer": schedule.optimizer,
        "lr_schedule": schedule.lr_schedule,
        "warmup_epochs": schedule.warmup_epochs,
        "held_out": options.held_out_fraction if options.layout == "image-folder" else None,
        "seed": options.seed,
        "eval_every": options.eval_every,
        "best_metric": options.best_metric,
        "output_dir": args.output_dir,
        "device": args.device,
        "workers": args.workers,
    }
    lines = ["# pml-lm train: the options of this run (pml-lm train --config reads this file)"]
    lines += [
        f"{key.replace('_', '-')} = {_toml_value(value)}"
        for key, value in values.items()
        if value is not None
    ]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from ..training.train_job import run_training

    args = _merged(args)
    args.output_dir = _given(args.output_dir, DEFAULT_OUTPUT_DIR)
    args.device = _given(args.device, DEFAULT_DEVICE)
    args.workers = _given(args.workers, DEFAULT_WORKERS)
    options = _options(args)
    bar = sys.stderr.isatty()
    if bar:
        from tqdm import tqdm

        echo = tqdm.write  # lines above the epoch's bar
    else:
        echo = print
    report = run_training(
        options,
        args.output_dir,
        resume=bool(args.resume),
        overwrite=bool(args.overwrite),
        device=args.device,
        workers=args.workers,
        effective_config=effective_config(options, args),
        echo=echo,
        progress_bar=bar,
    )
    width = max(map(len, report["metrics"]), default=0)
    for name, value in report["metrics"].items():
        print(
            f"  {name:{width}s} {value:.4f}"
            if isinstance(value, float)
            else f"  {name:{width}s} {value}"
        )
    return 0
