"""``pml-lm train``: train on your own images with a largest-margin loss, then evaluate."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import CommandError, check_output_dir


def add_subparser(subparsers) -> None:
    from ..training.loss_factory import LOSS_NAMES
    from ..training.recipes import RECIPES
    from ..training.train_job import LAYOUTS

    parser = subparsers.add_parser(
        "train",
        help="train an embedding network on an image folder or a Market-1501 dataset",
        description=(
            "DATA is a folder with one sub-folder of images per class (a share is held out for "
            "accuracy, margins, retrieval and verification), or a re-ID dataset: Market-1501 / "
            "DukeMTMC-reID folders (bounding_box_train, query, bounding_box_test) or MSMT17 list "
            "files, evaluated by CMC / mAP / mINP on query against gallery."
        ),
    )
    parser.add_argument("data", help="dataset folder")
    parser.add_argument("--layout", choices=LAYOUTS, default="auto")
    parser.add_argument(
        "--backbone",
        default="small-cnn",
        help='small-cnn (built in) or a torchvision model such as resnet18 (extra "train")',
    )
    parser.add_argument("--pretrained", action="store_true", help="torchvision's weights")
    parser.add_argument("--loss", choices=LOSS_NAMES, default="lm-softmax")
    parser.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default="package",
        help="defaults for the options below left out: this package's, or the authors' "
        "training script's (paper); see docs/monitor.md",
    )
    parser.add_argument("--scale", type=float, default=None, help="s of the cosine losses")
    parser.add_argument("--margin", type=float, default=None, help="the loss's margin, if any")
    parser.add_argument("--sample-margin-weight", type=float, default=None, help="λ of R_sm")
    parser.add_argument(
        "--zero-centroid-weight",
        type=float,
        default=None,
        help="λ of R_w (mean form; the sum form under --recipe paper)",
    )
    parser.add_argument(
        "--fixed-prototypes",
        default=None,
        metavar="FILE.npy",
        help="train against these frozen prototypes (embedding_size, num_classes); "
        "see pml-lm prototypes",
    )
    parser.add_argument("--embedding-size", type=int, default=128)
    parser.add_argument(
        "--image-size", default=None, help="N or HxW (64; 256x128 for a named re-ID layout)"
    )
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--held-out", type=float, default=0.2, help="held-out share per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=Path("pml-lm-train"))
    parser.add_argument("--resume", action="store_true", help="go on from OUTPUT_DIR's checkpoint")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--workers", type=int, default=2, help="data-loading processes")
    parser.set_defaults(func=run)


def _given(value, default):
    return default if value is None else value


def _options(args: argparse.Namespace):
    from dataclasses import replace

    from ..training.image_dataset import parse_image_size
    from ..training.recipes import get_recipe
    from ..training.train_job import TrainOptions

    if args.embedding_size < 1 or args.workers < 0:
        raise CommandError("--embedding-size must be at least 1 and --workers at least 0")
    if args.seed < 0:
        raise CommandError(f"--seed must be at least 0, got {args.seed}")
    recipe = get_recipe(args.recipe)
    return TrainOptions(
        data=args.data,
        layout=args.layout,
        backbone=args.backbone,
        pretrained=args.pretrained,
        loss=args.loss,
        scale=_given(args.scale, recipe.scale),
        margin=_given(args.margin, recipe.margin(args.loss)),
        sample_margin_weight=_given(args.sample_margin_weight, recipe.sample_margin_weight),
        zero_centroid_weight=_given(args.zero_centroid_weight, recipe.zero_centroid_weight),
        zero_centroid_form=recipe.zero_centroid_form,
        fixed_prototypes=args.fixed_prototypes,
        recipe=recipe.name,
        embedding_size=args.embedding_size,
        image_size=parse_image_size(args.image_size) if args.image_size else None,
        held_out_fraction=args.held_out,
        seed=args.seed,
        schedule=replace(
            recipe.schedule,
            epochs=_given(args.epochs, recipe.schedule.epochs),
            batch_size=_given(args.batch_size, recipe.schedule.batch_size),
            lr=_given(args.lr, recipe.schedule.lr),
        ),
    )


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..margin_monitor import format_epoch_line
    from ..training.train_job import run_training

    check_output_dir(args.output_dir)
    report = run_training(
        _options(args),
        args.output_dir,
        resume=args.resume,
        device=args.device,
        workers=args.workers,
        on_epoch=lambda record: tqdm.write(format_epoch_line(record)),
    )
    print(f"trained on {report['device']}; checkpoint and metrics.json in {args.output_dir}")
    for name, value in report["metrics"].items():
        print(f"  {name:28s} {value:.4f}" if isinstance(value, float) else f"  {name:28s} {value}")
    return 0
