"""``pml-lm embed CHECKPOINT DATA -o FEATURES.npz``: features for ``eval-reid`` / ``eval-verify``.

A re-ID layout (Market-1501 / DukeMTMC-reID folders, MSMT17 list files) gives the query and
gallery keys ``pml-lm eval-reid`` reads; an image folder (one sub-folder per class) gives the
embeddings and labelled pairs ``pml-lm eval-verify`` reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..training.options import (
    DEFAULT_DEVICE,
    DEFAULT_EMBED_BATCH_SIZE,
    DEFAULT_EMBED_WORKERS,
    DEFAULT_MAX_PAIRS,
    LAYOUTS,
)
from ..training.paths import check_can_create
from . import CommandError


def add_subparser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed",
        help="features of a dataset from a pml-lm train checkpoint, for eval-reid / eval-verify",
        description=__doc__.splitlines()[0].split(": ", 1)[1]
        + " Images are read at the checkpoint's image size and embedded in batches without "
        "gradients; features are unit-length unless --raw.",
    )
    parser.add_argument("checkpoint", type=Path, help="last.pt or best.pt of pml-lm train")
    parser.add_argument("data", type=Path, help="dataset folder")
    parser.add_argument(
        "-o", "--output", type=Path, required=True, metavar="FEATURES.npz", help="file to write"
    )
    parser.add_argument("--layout", choices=LAYOUTS, default="auto", help="default: detected")
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_EMBED_BATCH_SIZE, help="images per forward pass"
    )
    parser.add_argument(
        "--raw", action="store_true", help="keep the network's outputs (default: unit-length)"
    )
    parser.add_argument(
        "--max-pairs",
        type=int,
        default=DEFAULT_MAX_PAIRS,
        help="image folder: all pairs up to this many, else a uniform sample of this many",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the pair sample")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    parser.add_argument(
        "--device", default=DEFAULT_DEVICE, help="auto (CUDA when present), cpu, cuda"
    )
    parser.add_argument(
        "--workers", type=int, default=DEFAULT_EMBED_WORKERS, help="data-loading processes"
    )
    parser.set_defaults(func=run)


def _check_output(path: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output that would be renamed, exists, or cannot be written."""
    if path.suffix != ".npz":
        raise CommandError(f"-o {path}: the file name must end in .npz")
    if path.exists() and (path.is_dir() or not overwrite):
        raise CommandError(
            f"-o {path} is a directory"
            if path.is_dir()
            else f"-o {path} exists; pass --overwrite to replace it"
        )
    check_can_create(path, "-o")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..training.embed_job import embed_dataset
    from ..training.train_job import resolve_device

    _check_output(args.output, args.overwrite)
    if args.workers < 0 or args.max_pairs < 1:
        raise CommandError("--workers must be at least 0 and --max-pairs at least 1")
    arrays, layout = embed_dataset(
        args.checkpoint,
        args.data,
        layout=args.layout,
        device=resolve_device(args.device),
        batch_size=args.batch_size,
        workers=args.workers,
        normalize=not args.raw,
        max_pairs=args.max_pairs,
        seed=args.seed,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.output.with_name(args.output.name + ".tmp.npz")
    np.savez(temporary, **arrays)
    temporary.replace(args.output)
    if layout == "image-folder":
        num_pairs, total = len(arrays["pairs"]), len(arrays["paths"])
        total_pairs = total * (total - 1) // 2
        sampled = "" if num_pairs == total_pairs else f" (a uniform sample of {total_pairs})"
        print(
            f"{total} images of {len(arrays['class_names'])} classes, {num_pairs} pairs"
            f"{sampled}, in {args.output}; evaluate with pml-lm eval-verify {args.output}"
        )
    else:
        print(
            f"{len(arrays['query_pids'])} query and {len(arrays['gallery_pids'])} gallery "
            f"images ({layout}) in {args.output}; evaluate with pml-lm eval-reid {args.output}"
        )
    return 0
