"""Forward+backward time and peak memory of the margin heads against PML's ArcFaceLoss.

Every case runs in a fresh Python process (``benchmarks/_harness.py``): it builds the loss (W from
the loss's own ``weight_init_func``), a batch of embeddings that requires grad (norms around 20,
as a face backbone gives) and random labels, runs one warm-up step, then ``--repeats`` timed steps
of ``loss(embeddings, labels).backward()`` with gradients reset to None before each, and reports
the best step; with ``--rounds R`` every case runs R times, the cases interleaved round by round
(so a change of machine load hits all of them alike), and the best round is reported. Memory on CPU is the peak resident set size minus the resident size after the
imports (W, its gradient, the batch and every temporary of the step); on CUDA
``torch.cuda.max_memory_allocated``. ``gm-arcface`` (GM-Softmax's arcface preset on the same
fused kernel) shows what the heads add to the kernel.

    flock /tmp/bench.lock env PYTHONPATH=. python benchmarks/bench_heads.py
    python benchmarks/bench_heads.py --device cuda --cases pml-arcface adaface
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import (  # noqa: E402
    best_result,
    best_seconds,
    current_rss_bytes,
    machine_description,
    measure_in_fresh_process,
    peak_rss_bytes,
    ratio,
    run_case_if_asked,
)

CASES = {
    "pml-arcface": "PML ArcFaceLoss (m = 0.5 rad, s = 64)",
    "gm-arcface": "GM-Softmax arcface (the fused kernel alone)",
    "adaface": "AdaFaceLoss",
    "magface": "MagFaceLoss",
    "curricularface": "CurricularFaceLoss (its own kernel)",
    "gm-arcface-sub3": "GM-Softmax arcface, 3 sub-centres (W of 3·C columns)",
    "pml-sub-arcface-3": "PML SubCenterArcFaceLoss, 3 sub-centres",
    "elasticface-arc": "ElasticFaceLoss arc",
    "elasticface-cos": "ElasticFaceLoss cos",
    "adacos-fixed": "AdaCosLoss fixed",
    "adacos": "AdaCosLoss dynamic",
    "dynamic-margin": "DynamicMarginLoss",
}
REFERENCE = "pml-arcface"
EMBEDDING_NORM = 20.0


def _build_loss(case: str, num_classes: int, dim: int):
    from pytorch_metric_learning import losses as pml_losses

    from pml_largest_margin import losses

    args = (num_classes, dim)
    ours = {"validate_inputs": False, "record_class_margin": False}
    builders = {
        "pml-arcface": lambda: pml_losses.ArcFaceLoss(*args, margin=math.degrees(0.5), scale=64),
        "gm-arcface": lambda: losses.GeneralizedMarginSoftmaxLoss.preset("arcface", *args, **ours),
        "gm-arcface-sub3": lambda: losses.GeneralizedMarginSoftmaxLoss.preset(
            "arcface", *args, sub_centers=3, **ours
        ),
        "pml-sub-arcface-3": lambda: pml_losses.SubCenterArcFaceLoss(
            num_classes=num_classes, embedding_size=dim, margin=math.degrees(0.5), sub_centers=3
        ),
        "adaface": lambda: losses.AdaFaceLoss(*args, **ours),
        "magface": lambda: losses.MagFaceLoss(*args, **ours),
        "curricularface": lambda: losses.CurricularFaceLoss(*args, **ours),
        "elasticface-arc": lambda: losses.ElasticFaceLoss(*args, variant="arc", **ours),
        "elasticface-cos": lambda: losses.ElasticFaceLoss(*args, variant="cos", **ours),
        "adacos-fixed": lambda: losses.AdaCosLoss(*args, dynamic=False, **ours),
        "adacos": lambda: losses.AdaCosLoss(*args, dynamic=True, **ours),
        # Long-tailed counts 1..1000, so that the margins differ between classes.
        "dynamic-margin": lambda: losses.DynamicMarginLoss(
            *args, class_counts=[1 + index % 1000 for index in range(num_classes)], **ours
        ),
    }
    return builders[case]()


def run_case(
    case: str, num_classes: int, batch: int, dim: int, repeats: int, device: str, threads: int
) -> dict:
    """Measure one case in this process (run in a fresh subprocess by ``main``)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    baseline = current_rss_bytes()
    torch.manual_seed(0)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    directions = torch.nn.functional.normalize(torch.randn(batch, dim, device=device), dim=1)
    embeddings = (EMBEDDING_NORM * directions).requires_grad_(True)
    loss_fn = _build_loss(case, num_classes, dim).to(device)

    def step():
        embeddings.grad = None
        loss_fn.W.grad = None
        loss_fn(embeddings, labels).backward()

    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = best_seconds(step, repeats, synchronize)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss_bytes() - baseline
    return {"seconds": seconds, "peak_bytes": peak}


def main(argv: list[str] | None = None) -> None:
    if run_case_if_asked(run_case, argv):
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="fresh processes per case")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    args = parser.parse_args(argv)
    cases = [REFERENCE, *(case for case in args.cases if case != REFERENCE)]

    print(f"Machine: {machine_description(args.device)}")
    print(
        f"C = {args.classes}, batch {args.batch}, d = {args.dim}; fwd+bwd, best of "
        f"{args.repeats} after a warm-up, each case in a fresh process, best of {args.rounds} "
        "interleaved rounds\n"
    )
    best: dict[str, dict] = {}
    for round_index in range(args.rounds):
        for case in cases:
            result = measure_in_fresh_process(
                __file__,
                case=case,
                num_classes=args.classes,
                batch=args.batch,
                dim=args.dim,
                repeats=args.repeats,
                device=args.device,
                threads=args.threads,
            )
            print(
                f"round {round_index + 1}: {case} {1000 * result['seconds']:.0f} ms, "
                f"{result['peak_bytes'] / 2**20:.0f} MB",
                flush=True,
            )
            best[case] = best_result(best.get(case), result)
    print("\n| case | time (ms) | × PML ArcFace | peak mem (MB) | mem × PML ArcFace |")
    print("|---|---|---|---|---|")
    reference = best[REFERENCE]
    for case in cases:
        result = best[case]
        print(
            f"| {CASES[case]} | {1000 * result['seconds']:.0f} "
            f"| {ratio(result['seconds'], reference['seconds'])} "
            f"| {result['peak_bytes'] / 2**20:.0f} "
            f"| {ratio(result['peak_bytes'], reference['peak_bytes'])} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
