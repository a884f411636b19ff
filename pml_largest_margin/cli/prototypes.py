"""``pml-lm prototypes``: maximally separated fixed prototypes, saved for ``train --fixed-prototypes``."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import CommandError, check_output_file


def add_subparser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prototypes",
        help="write maximally separated class prototypes to a .npy file",
        description=(
            "Writes W of shape (EMBEDDING_SIZE, NUM_CLASSES), one unit column per class, in "
            "PML's layout: the regular simplex when NUM_CLASSES <= EMBEDDING_SIZE + 1 (the "
            "largest class margin there is), otherwise prototypes optimised numerically. Prints "
            "the class margin reached next to its upper bound. Train against them with "
            "pml-lm train --fixed-prototypes FILE.npy."
        ),
    )
    parser.add_argument("num_classes", type=int, metavar="NUM_CLASSES", help="C, at least 2")
    parser.add_argument("embedding_size", type=int, metavar="EMBEDDING_SIZE", help="d, at least 1")
    parser.add_argument(
        "-o", "--output", type=Path, required=True, metavar="FILE.npy", help="where W goes"
    )
    parser.add_argument(
        "--steps", type=int, default=2000, help="optimisation steps when there is no simplex"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the optimisation")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..prototypes import max_separated_prototypes

    if args.num_classes < 2 or args.embedding_size < 1:
        raise CommandError(
            "need NUM_CLASSES >= 2 and EMBEDDING_SIZE >= 1, got "
            f"{args.num_classes} and {args.embedding_size}"
        )
    check_output_file(args.output, "--output")
    result = max_separated_prototypes(
        args.num_classes, args.embedding_size, steps=args.steps, seed=args.seed
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    # Through a file object, so that np.save does not append ".npy" to another suffix.
    with open(args.output, "wb") as handle:
        np.save(handle, result.prototypes.numpy().astype(np.float32))
    kind = "regular simplex" if result.steps == 0 else f"optimised, {result.steps} steps"
    print(
        f"{args.num_classes} prototypes in R^{args.embedding_size} ({kind}): class margin "
        f"{result.degrees:.4f}° (bound {result.upper_bound_degrees:.4f}°); "
        f"W {tuple(result.prototypes.shape)} written to {args.output}"
    )
    return 0
