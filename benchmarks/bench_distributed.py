"""Per-rank peak memory and step time of class-parallel training against world size.

Each case runs in a fresh process (``_harness.measure_in_fresh_process``), which spawns the case's
ranks (gloo on CPU, joined through a store file). Every rank runs a few SGD-with-momentum steps of
a small backbone (DDP) plus a classification loss owning W (d, C). Reported per case, as the
largest over its ranks (what has to fit on one device): peak RSS, the peak above the RSS just
before the loss is built (W, its gradient, the optimizer state and the step's buffers), and the
best step time after a warm-up step. Incumbent: PML's ArcFaceLoss, whose W is whole on every rank
(under DistributedLossWrapper when there are 2 ranks).

    flock /tmp/bench.lock env PYTHONPATH=. python benchmarks/bench_distributed.py
    env PYTHONPATH=. python benchmarks/bench_distributed.py --cases 2000000:256 \
        --kinds class-parallel --memory stream

Options of the class-parallel loss travel to every rank as ``loss_options`` (a JSON-able dict of
constructor arguments), so a new loss option needs one command-line flag that adds to it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import queue
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _harness import (
    best_seconds,
    current_rss_bytes,
    machine_description,
    measure_in_fresh_process,
    peak_rss_bytes,
    ratio,
    run_case_if_asked,
)
from pytorch_metric_learning.losses import ArcFaceLoss
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

# The losses are imported here, before any rank measures its baseline: their modules never count.
from pml_largest_margin.distributed import ClassParallelLargestMarginSoftmaxLoss

TIMED_STEPS = 3  # after one untimed warm-up step
INPUT_SIZE = 64
KINDS = ("class-parallel LM-Softmax", "PML ArcFaceLoss (W on every rank)")
# --kinds names -> the kinds above.
KIND_NAMES = {"class-parallel": KINDS[0], "pml-arcface": KINDS[1]}
CASE_TIMEOUT_S = 1200


def _build_loss(kind: str, num_classes: int, embedding_size: int, loss_options: dict):
    if kind == KINDS[0]:
        return ClassParallelLargestMarginSoftmaxLoss(
            num_classes, embedding_size, scale=32.0, **loss_options
        )
    loss = ArcFaceLoss(num_classes, embedding_size)
    return DistributedLossWrapper(loss) if dist.get_world_size() > 1 else loss


def _rank(rank, world_size, store_file, case, results):
    torch.set_num_threads(max(1, os.cpu_count() // world_size))
    dist.init_process_group(
        "gloo",
        init_method=Path(store_file).as_uri(),
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=CASE_TIMEOUT_S),
    )
    try:
        torch.manual_seed(rank)
        backbone = torch.nn.parallel.DistributedDataParallel(
            torch.nn.Linear(INPUT_SIZE, case["embedding_size"])
        )
        local_batch = case["batch_size"] // world_size
        inputs = torch.randn(local_batch, INPUT_SIZE)
        labels = torch.randint(case["num_classes"], (local_batch,))
        baseline = current_rss_bytes()
        loss_fn = _build_loss(
            case["kind"], case["num_classes"], case["embedding_size"], case["loss_options"]
        )
        optimizer = torch.optim.SGD(
            [*backbone.parameters(), *loss_fn.parameters()], lr=0.01, momentum=0.9
        )

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss_fn(backbone(inputs), labels).backward()
            optimizer.step()

        seconds = best_seconds(step, TIMED_STEPS, synchronize=dist.barrier)
        peak = peak_rss_bytes()
        results.put((rank, peak, peak - baseline, seconds))  # plain numbers only
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_case(
    kind: str,
    world_size: int,
    num_classes: int,
    embedding_size: int,
    batch_size: int,
    loss_options: dict,
) -> dict:
    """One case's ranks, spawned from this (fresh) process; the largest figure over the ranks."""
    case = {
        "kind": kind,
        "num_classes": num_classes,
        "embedding_size": embedding_size,
        "batch_size": batch_size,
        "loss_options": loss_options,
    }
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as folder:
        store_file = str(Path(folder) / "store")
        ranks = [
            context.Process(target=_rank, args=(rank, world_size, store_file, case, results))
            for rank in range(world_size)
        ]
        for process in ranks:
            process.start()
        try:
            rows = [results.get(timeout=CASE_TIMEOUT_S) for _ in ranks]
        except queue.Empty as error:
            raise RuntimeError(f"the ranks of case {case} gave no result") from error
        finally:
            for process in ranks:
                process.join(timeout=60)
    return {
        "peak_rss_bytes": max(row[1] for row in rows),
        "above_baseline_bytes": max(row[2] for row in rows),
        "step_seconds": max(row[3] for row in rows),
    }


def main():
    if run_case_if_asked(run_case):
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedding-size", type=int, default=128)
    parser.add_argument(
        "--cases",
        default="1000000:64,100000:256",
        help="comma-separated num_classes:global_batch pairs",
    )
    parser.add_argument("--world-sizes", default="1,2")
    parser.add_argument(
        "--sample-rate",
        type=float,
        default=1.0,
        help="the class-parallel loss's sample_rate (PML's loss always uses every class)",
    )
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=list(KIND_NAMES),
        default=list(KIND_NAMES),
        help="losses to run (default: both)",
    )
    parser.add_argument(
        "--memory",
        choices=["buffer", "stream", "auto"],
        default="auto",
        help="the class-parallel loss's memory path, decided per rank for its own classes",
    )
    args = parser.parse_args()
    world_sizes = [int(size) for size in args.world_sizes.split(",")]
    loss_options = {"sample_rate": args.sample_rate, "memory": args.memory}
    print(f"Machine: {machine_description()}; gloo; SGD with momentum; d = {args.embedding_size}")
    print(f"Class-parallel loss options: {loss_options}")
    print()
    print(
        "| loss | C | global batch | ranks | peak RSS / rank (MB) | above baseline / rank (MB) "
        "| ratio to 1 rank | step time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    mb = 2**20
    script = os.path.abspath(__file__)
    for case in args.cases.split(","):
        num_classes, batch_size = map(int, case.split(":"))
        for kind in (KIND_NAMES[name] for name in args.kinds):
            single = None
            for world_size in world_sizes:
                result = measure_in_fresh_process(
                    script,
                    kind=kind,
                    world_size=world_size,
                    num_classes=num_classes,
                    embedding_size=args.embedding_size,
                    batch_size=batch_size,
                    loss_options=loss_options if kind == KINDS[0] else {},
                )
                peak, above = result["peak_rss_bytes"], result["above_baseline_bytes"]
                single = single or (peak, above)
                print(
                    f"| {kind} | {num_classes:,} | {batch_size} | {world_size} | {peak / mb:,.0f} "
                    f"| {above / mb:,.0f} | {ratio(peak, single[0])} (above baseline: "
                    f"{ratio(above, single[1])}) | {result['step_seconds']:.3f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
