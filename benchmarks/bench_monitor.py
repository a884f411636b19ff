"""What the margin monitor adds to a digits training run (C = 10), the demo's MLP and schedule.

Run:  PYTHONPATH=. python benchmarks/bench_monitor.py [--epochs 60] [--rounds 3] [--pairs 4]
      [--breakdown]

Every training starts from seed 0 and runs through PML's ``MetricLossOnly`` trainer on one torch
thread, as in ``pml-lm demo``. Unmonitored: the loss records nothing and no hook is installed.
Monitored: LM-Softmax records its sample margins and target cosines as tensors
(``record_target_cosines``) and the monitor reads them; NormFace (PML's
``NormalizedSoftmaxLoss``) records nothing, so the monitor measures each batch itself (one extra
(N, C) product); both close an epoch every pass over the data (class margin, histogram).

Built for a shared machine, where the load changes from one second to the next: each round is a
fresh process (benchmarks/_harness.py) that warms both variants up, then trains ``--pairs``
pairs of runs, unmonitored and monitored back to back, the order flipping from pair to pair
(off-on, on-off, ...) so that a drift of the load favours neither. The table gives the median
over all runs of each variant of the wall-clock and of the CPU (process) time per run, the
overhead from those medians, and the median over the pairs of the monitored / unmonitored CPU
ratio. CPU time counts only this process's work, so it is the steadier of the two under load.
``--breakdown`` adds, from one more fresh process, LM-Softmax in a plain loop: the loss that
records nothing, the loss that records, and that loss read by a monitor, with the time spent
inside the monitor's ``update`` and ``end_epoch``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import machine_description, measure_in_fresh_process, run_case_if_asked  # noqa: E402


def run_case(loss: str, epochs: int, pairs: int) -> dict:
    import torch

    from pml_largest_margin.demo.data import load_digits_split
    from pml_largest_margin.demo.methods import EMBEDDING_SIZE, SCALE, embedding_network
    from pml_largest_margin.margin_monitor import MarginMonitor
    from pml_largest_margin.training.loss_factory import build_loss
    from pml_largest_margin.training.trainer import (
        Schedule,
        build_trainer,
        iterations_per_epoch,
        run_epochs,
    )

    torch.set_num_threads(1)
    split = load_digits_split()
    dataset = torch.utils.data.TensorDataset(split.train_x, split.train_y)

    def train(num_epochs: int, monitored: bool) -> tuple[float, float]:
        torch.manual_seed(0)
        schedule = Schedule(epochs=num_epochs)
        model = embedding_network()
        criterion = build_loss(
            loss, split.num_classes, EMBEDDING_SIZE, scale=SCALE, record_margins=monitored
        )
        hooks = {}
        if monitored:
            monitor = MarginMonitor(
                split.num_classes,
                EMBEDDING_SIZE,
                iterations_per_epoch=iterations_per_epoch(len(dataset), schedule.batch_size),
            )
            if not getattr(criterion, "record_target_cosines", False):
                monitor.watch(criterion)
            hooks = dict(
                end_of_iteration_hook=monitor.end_of_iteration_hook,
                end_of_epoch_hook=monitor.end_of_epoch_hook,
            )
        trainer = build_trainer(
            model,
            criterion,
            dataset,
            schedule,
            device=torch.device("cpu"),
            epochs_per_trainer_epoch=num_epochs,
            **hooks,
        )
        wall, cpu = time.perf_counter(), time.process_time()
        run_epochs(trainer, 1, 1)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if monitored:
            assert len(monitor.history) == num_epochs
        return wall, cpu

    for monitored in (False, True):  # warm-up: imports, allocator, kernels
        train(2, monitored)
    runs = {"off": [], "on": []}
    for pair in range(pairs):
        for monitored in (False, True) if pair % 2 == 0 else (True, False):
            runs["on" if monitored else "off"].append(train(epochs, monitored))
    return runs


def run_breakdown(epochs: int, repeats: int) -> dict:
    """Where LM-Softmax's monitored time goes, in a plain loop (no trainer): CPU µs per batch of
    the loss that records nothing, the loss that records (``record_target_cosines``), and that
    loss read by a monitor, interleaved ``repeats`` times; and, in the monitored runs, the time
    inside ``MarginMonitor.update`` and ``end_epoch``."""
    import torch

    from pml_largest_margin.demo.data import load_digits_split
    from pml_largest_margin.demo.methods import EMBEDDING_SIZE, SCALE, embedding_network
    from pml_largest_margin.margin_monitor import MarginMonitor
    from pml_largest_margin.training.loss_factory import build_loss

    torch.set_num_threads(1)
    split = load_digits_split()
    size = 64
    batches = [
        (split.train_x[i : i + size], split.train_y[i : i + size])
        for i in range(0, len(split.train_y) - size + 1, size)
    ]
    inside = {"update": 0.0, "end_epoch": 0.0}

    def train(variant: str, num_epochs: int) -> float:
        torch.manual_seed(0)
        model = embedding_network()
        criterion = build_loss(
            "lm-softmax",
            split.num_classes,
            EMBEDDING_SIZE,
            scale=SCALE,
            record_margins=variant != "off",
        )
        parameters = [*model.parameters(), *criterion.parameters()]
        optimizer = torch.optim.SGD(parameters, lr=0.01, momentum=0.9)
        monitor = MarginMonitor(split.num_classes, EMBEDDING_SIZE)
        start = time.process_time()
        for _ in range(num_epochs):
            for x, y in batches:
                optimizer.zero_grad()
                loss = criterion(model(x), y)
                if variant == "monitored":
                    piece = time.process_time()
                    monitor.update(criterion)
                    inside["update"] += time.process_time() - piece
                loss.backward()
                optimizer.step()
            if variant == "monitored":
                piece = time.process_time()
                monitor.end_epoch(criterion.W)
                inside["end_epoch"] += time.process_time() - piece
        return time.process_time() - start

    variants = ("off", "recording", "monitored")
    for variant in variants:  # warm-up
        train(variant, 2)
    inside.update(update=0.0, end_epoch=0.0)
    times = {variant: [] for variant in variants}
    for repeat in range(repeats):
        for variant in variants if repeat % 2 == 0 else variants[::-1]:
            times[variant].append(train(variant, epochs))
    num_batches = epochs * len(batches) * repeats
    return {
        "us_per_batch": {
            v: 1e6 * statistics.median(t) / (epochs * len(batches)) for v, t in times.items()
        },
        "inside_us_per_batch": {name: 1e6 * t / num_batches for name, t in inside.items()},
        "batches_per_epoch": len(batches),
    }


def print_breakdown(epochs: int, repeats: int) -> None:
    script = str(Path(__file__).resolve())
    result = measure_in_fresh_process(script, breakdown=True, epochs=epochs, pairs=repeats)
    per_batch, inside = result["us_per_batch"], result["inside_us_per_batch"]
    print(
        f"\nPlain loop, LM-Softmax, {epochs} epochs x {result['batches_per_epoch']} batches, ",
        end="",
    )
    print(f"median of {repeats} interleaved runs each (CPU µs per batch):")
    for variant, value in per_batch.items():
        print(f"  {variant:10s} {value:7.0f}  ({100 * (value / per_batch['off'] - 1):+.1f} %)")
    for name, value in inside.items():
        print(f"  inside MarginMonitor.{name}: {value:.1f} µs per batch")


def run_any_case(breakdown: bool = False, **params) -> dict:
    """The child process's case: a breakdown or off/on pairs of one loss."""
    if breakdown:
        return run_breakdown(params["epochs"], params["pairs"])
    return run_case(**params)


def main() -> None:
    if run_case_if_asked(run_any_case):
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per loss")
    parser.add_argument("--pairs", type=int, default=4, help="off/on pairs of runs per round")
    parser.add_argument("--losses", nargs="+", default=["lm-softmax", "normface"])
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also time LM-Softmax's pieces in a plain loop (--pairs interleaved repeats)",
    )
    args = parser.parse_args()
    print(f"Machine: {machine_description()}; load average {os.getloadavg()[0]:.1f} at start")
    print(f"Digits, C = 10, MLP 64-128-128-32, {args.epochs} epochs, batch 64, 1 torch thread")
    print(
        f"{args.rounds} rounds x {args.pairs} pairs: medians over {args.rounds * args.pairs} runs\n"
    )
    print(
        "| loss | monitor reads | wall off (s) | wall on (s) | wall + % "
        "| CPU off (s) | CPU on (s) | CPU + % | CPU + % of pairs, median (min to max) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    script = str(Path(__file__).resolve())
    for loss in args.losses:
        runs = {"off": [], "on": []}
        for _ in range(args.rounds):
            timing = measure_in_fresh_process(
                script, loss=loss, epochs=args.epochs, pairs=args.pairs
            )
            for variant in runs:
                runs[variant] += timing[variant]
        wall = {v: statistics.median(t[0] for t in runs[v]) for v in runs}
        cpu = {v: statistics.median(t[1] for t in runs[v]) for v in runs}
        # Pairs were appended in the same order to both lists, so zip matches them.
        pair_overheads = [
            100 * (on[1] / off[1] - 1) for off, on in zip(runs["off"], runs["on"], strict=True)
        ]
        reads = (
            "the loss's recorded tensors"
            if loss == "lm-softmax"
            else "the batch (one extra N×C product)"
        )
        print(
            f"| {loss} | {reads} | {wall['off']:.2f} | {wall['on']:.2f} | "
            f"{100 * (wall['on'] / wall['off'] - 1):+.1f} | {cpu['off']:.2f} | {cpu['on']:.2f} | "
            f"{100 * (cpu['on'] / cpu['off'] - 1):+.1f} | {statistics.median(pair_overheads):+.1f} "
            f"({min(pair_overheads):+.1f} to {max(pair_overheads):+.1f}) |",
            flush=True,
        )
    if args.breakdown:
        print_breakdown(args.epochs, args.pairs)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
