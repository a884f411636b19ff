"""What the margin monitor adds to a digits training run (C = 10), the demo's MLP and schedule.

Run:  PYTHONPATH=. python benchmarks/bench_monitor.py [--epochs 60] [--rounds 3]

Each case (loss × monitored or not) trains from seed 0 through PML's ``MetricLossOnly`` trainer
in a fresh process (benchmarks/_harness.py), one torch thread as in ``pml-lm demo``, and reports
the best of ``--repeats`` runs after a warm-up run. Unmonitored: the loss records nothing and no
hook is installed. Monitored: LM-Softmax records its sample margins and target cosines
(``collect_stats``, ``record_target_cosines``) and the monitor reads them; NormFace (PML's
``NormalizedSoftmaxLoss``) records nothing, so the monitor measures each batch itself (one extra
(N, C) product); both close an epoch every pass over the data (class margin, histogram). Cases
alternate, off then on, for ``--rounds`` rounds; the overhead is taken from the best time of each
case over all rounds, wall-clock and CPU (process) time. On a shared machine the CPU time is the
steadier of the two.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import machine_description, measure_in_fresh_process, run_case_if_asked  # noqa: E402


def run_case(loss: str, monitored: bool, epochs: int, repeats: int) -> dict:
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

    def train(num_epochs: int) -> tuple[float, float]:
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

    train(2)  # warm-up: imports, allocator, kernels
    timings = [train(epochs) for _ in range(repeats)]
    return {"wall": min(t[0] for t in timings), "cpu": min(t[1] for t in timings)}


def main() -> None:
    if run_case_if_asked(run_case):
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--losses", nargs="+", default=["lm-softmax", "normface"])
    args = parser.parse_args()
    print(f"Machine: {machine_description()}")
    print(f"Digits, C = 10, MLP 64-128-128-32, {args.epochs} epochs, batch 64, 1 torch thread\n")
    print(
        "| loss | monitor reads | wall off (s) | wall on (s) | wall + % | CPU off (s) | CPU on (s) | CPU + % |"
    )
    print("|---|---|---|---|---|---|---|---|")
    script = str(Path(__file__).resolve())
    for loss in args.losses:
        best = {False: {"wall": float("inf"), "cpu": float("inf")}}
        best[True] = dict(best[False])
        for _ in range(args.rounds):
            for monitored in (False, True):
                timing = measure_in_fresh_process(
                    script, loss=loss, monitored=monitored, epochs=args.epochs, repeats=args.repeats
                )
                for key in ("wall", "cpu"):
                    best[monitored][key] = min(best[monitored][key], timing[key])
        off, on = best[False], best[True]
        reads = "the loss's stats" if loss == "lm-softmax" else "the batch (one extra N×C product)"
        print(
            f"| {loss} | {reads} | {off['wall']:.2f} | {on['wall']:.2f} | "
            f"{100 * (on['wall'] / off['wall'] - 1):+.1f} | {off['cpu']:.2f} | {on['cpu']:.2f} | "
            f"{100 * (on['cpu'] / off['cpu'] - 1):+.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
