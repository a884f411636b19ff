"""Per-rank peak memory and step time of class-parallel training against world size.

Each case starts fresh processes (gloo on CPU) that run a few SGD-with-momentum steps of a small
backbone (DDP) plus a classification loss owning W (d, C). Reported per rank: peak RSS, the peak
above the process's RSS just before the loss is built (W, its gradient, the optimizer state and
the step's buffers), and the median step time. Incumbent: PML's ArcFaceLoss, whose W is whole on
every rank (under DistributedLossWrapper when there are 2 ranks).

    flock /tmp/bench.lock env PYTHONPATH=. python benchmarks/bench_distributed.py
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS = 4  # the first is a warm-up and is not timed
INPUT_SIZE = 64


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _build_loss(kind, num_classes, embedding_size):
    if kind == "class-parallel LM-Softmax":
        from pml_largest_margin.distributed import ClassParallelLargestMarginSoftmaxLoss

        return ClassParallelLargestMarginSoftmaxLoss(num_classes, embedding_size, scale=32.0)
    from pytorch_metric_learning.losses import ArcFaceLoss
    from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

    loss = ArcFaceLoss(num_classes, embedding_size)
    return DistributedLossWrapper(loss) if dist.get_world_size() > 1 else loss


def _worker(rank, world_size, port, kind, num_classes, embedding_size, batch_size, results):
    torch.set_num_threads(max(1, os.cpu_count() // world_size))
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=600),
    )
    torch.manual_seed(rank)
    backbone = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Linear(INPUT_SIZE, embedding_size)
    )
    local_batch = batch_size // world_size
    inputs = torch.randn(local_batch, INPUT_SIZE)
    labels = torch.randint(num_classes, (local_batch,))
    baseline = _rss_bytes()
    loss_fn = _build_loss(kind, num_classes, embedding_size)
    optimizer = torch.optim.SGD(
        [*backbone.parameters(), *loss_fn.parameters()], lr=0.01, momentum=0.9
    )
    times = []
    for _ in range(STEPS):
        dist.barrier()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(backbone(inputs), labels).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results.put((rank, peak, peak - baseline, statistics.median(times[1:])))
    dist.barrier()
    dist.destroy_process_group()


def run_case(kind, world_size, num_classes, embedding_size, batch_size):
    context = mp.get_context("spawn")
    results = context.Queue()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = (world_size, port, kind, num_classes, embedding_size, batch_size, results)
    workers = [context.Process(target=_worker, args=(rank, *args)) for rank in range(world_size)]
    for worker in workers:
        worker.start()
    rows = sorted(results.get(timeout=1200) for _ in workers)
    for worker in workers:
        worker.join()
    # The largest rank is what has to fit on a device.
    return max(row[1] for row in rows), max(row[2] for row in rows), max(row[3] for row in rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedding-size", type=int, default=128)
    parser.add_argument(
        "--cases",
        default="1000000:64,100000:256",
        help="comma-separated num_classes:global_batch pairs",
    )
    parser.add_argument("--world-sizes", default="1,2")
    args = parser.parse_args()
    world_sizes = [int(size) for size in args.world_sizes.split(",")]
    print(
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, gloo; SGD with momentum; d = {args.embedding_size}"
    )
    print()
    print(
        "| loss | C | global batch | ranks | peak RSS / rank (MB) | above baseline / rank (MB) "
        "| ratio to 1 rank | step time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    mb = 2**20
    for case in args.cases.split(","):
        num_classes, batch_size = map(int, case.split(":"))
        for kind in ("class-parallel LM-Softmax", "PML ArcFaceLoss (W on every rank)"):
            single = None
            for world_size in world_sizes:
                peak, above, step = run_case(
                    kind, world_size, num_classes, args.embedding_size, batch_size
                )
                single = single or (peak, above)
                print(
                    f"| {kind} | {num_classes:,} | {batch_size} | {world_size} | {peak / mb:,.0f} "
                    f"| {above / mb:,.0f} | {peak / single[0]:.2f} (above baseline: "
                    f"{above / single[1]:.2f}) | {step:.3f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
