"""Forward+backward time and peak memory of the margin-softmax losses against PML's own classes.

Every case (loss x number of classes) runs in a fresh Python subprocess, so that memory left over by
one case cannot hide or inflate another. A case builds the loss (W initialised by the loss's own
``weight_init_func``), a batch of embeddings that requires grad and random labels, runs one warm-up
step, then ``--repeats`` timed steps of ``loss(embeddings, labels).backward()`` with gradients reset
to None before each step (as ``optimizer.zero_grad()`` does), and reports the best step.

Memory on CPU is the peak resident set size of the subprocess (``ru_maxrss``) minus its resident
size after the imports, so it counts W, its gradient, the batch and every temporary of the step.
On CUDA it is ``torch.cuda.max_memory_allocated``. The floor is the three matrix products that any
implementation of these losses needs (``ẑ W``, the cosine gradient times ``W^T``, ``ẑ^T`` times it)
timed alone, without autograd.

    flock /tmp/bench.lock env PYTHONPATH=. python benchmarks/bench_losses.py
    python benchmarks/bench_losses.py --device cuda --classes 1000000
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import subprocess
import sys
import time

# (label, how to build it, the PML class it is compared with)
CASES = {
    "floor": ("three matrix products", None),
    "lm": ("LargestMarginSoftmaxLoss", None),
    "gm-normface": ("GM-Softmax normface", "pml-normalizedsoftmax"),
    "gm-cosface": ("GM-Softmax cosface", "pml-cosface"),
    "gm-arcface": ("GM-Softmax arcface", "pml-arcface"),
    "gm-sphereface": ("GM-Softmax sphereface", "pml-sphereface"),
    "pml-normalizedsoftmax": ("PML NormalizedSoftmaxLoss", None),
    "pml-cosface": ("PML CosFaceLoss", None),
    "pml-arcface": ("PML ArcFaceLoss", None),
    "pml-sphereface": ("PML SphereFaceLoss", None),
    # With λ·R_sm: ours from the margins the fused kernel already holds, PML's through
    # with_sample_margin_regularizer (one more N × d × C product and (N, C) buffer).
    "lm-rsm": ("LM-Softmax + R_sm", "pml-arcface-rsm"),
    "pml-arcface-rsm": ("PML ArcFaceLoss + R_sm (with_sample_margin_regularizer)", None),
}
SCALE, ARC_MARGIN, COS_MARGIN, SPHERE_MARGIN = 64.0, 0.5, 0.35, 4
SAMPLE_MARGIN_WEIGHT = 0.1
# Cases not run unless asked for with --cases (the default set is the original table).
EXTRA_CASES = ("lm-rsm", "pml-arcface-rsm")


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _build_loss(case: str, num_classes: int, embedding_size: int):
    from pytorch_metric_learning import losses as pml_losses

    from pml_largest_margin.losses import GeneralizedMarginSoftmaxLoss, LargestMarginSoftmaxLoss
    from pml_largest_margin.regularizers import (
        SampleMarginRegularizer,
        with_sample_margin_regularizer,
    )

    args = (num_classes, embedding_size)
    sample_margin = {
        "sample_margin_regularizer": SampleMarginRegularizer(),
        "sample_margin_reg_weight": SAMPLE_MARGIN_WEIGHT,
    }
    ours = {
        "lm": lambda: LargestMarginSoftmaxLoss(*args, scale=SCALE, validate_inputs=False),
        "gm-normface": lambda: GeneralizedMarginSoftmaxLoss.preset("normface", *args, scale=SCALE),
        "gm-cosface": lambda: GeneralizedMarginSoftmaxLoss.preset(
            "cosface", *args, scale=SCALE, margin=COS_MARGIN
        ),
        "gm-arcface": lambda: GeneralizedMarginSoftmaxLoss.preset(
            "arcface", *args, scale=SCALE, margin=ARC_MARGIN
        ),
        "gm-sphereface": lambda: GeneralizedMarginSoftmaxLoss.preset(
            "sphereface", *args, scale=SCALE, margin=SPHERE_MARGIN
        ),
        "pml-normalizedsoftmax": lambda: pml_losses.NormalizedSoftmaxLoss(
            *args, temperature=1 / SCALE
        ),
        "pml-cosface": lambda: pml_losses.CosFaceLoss(*args, margin=COS_MARGIN, scale=SCALE),
        "pml-arcface": lambda: pml_losses.ArcFaceLoss(
            *args, margin=math.degrees(ARC_MARGIN), scale=SCALE
        ),
        "pml-sphereface": lambda: pml_losses.SphereFaceLoss(*args, margin=SPHERE_MARGIN, scale=1.0),
        "lm-rsm": lambda: LargestMarginSoftmaxLoss(
            *args, scale=SCALE, validate_inputs=False, **sample_margin
        ),
        "pml-arcface-rsm": lambda: with_sample_margin_regularizer(pml_losses.ArcFaceLoss)(
            *args, margin=math.degrees(ARC_MARGIN), scale=SCALE, **sample_margin
        ),
    }
    loss = ours[case]()
    if case.startswith("gm-"):
        loss.validate_inputs = False
    return loss


def run_case(
    case: str, num_classes: int, batch: int, dim: int, repeats: int, device: str, threads: int
):
    """Measure one case in this process; returns a dict (run in a fresh subprocess)."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    baseline = _current_rss_bytes()
    torch.manual_seed(0)
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    embeddings = torch.randn(batch, dim, device=device, requires_grad=True)
    if case == "floor":
        weights = torch.randn(dim, num_classes, device=device)
        unit = torch.nn.functional.normalize(embeddings.detach(), dim=1)

        def step():
            cosines = unit @ weights
            _ = cosines @ weights.t()
            _ = unit.t() @ cosines
    else:
        loss_fn = _build_loss(case, num_classes, dim).to(device)

        def step():
            embeddings.grad = None
            loss_fn.W.grad = None
            loss_fn(embeddings, labels).backward()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats + 1):
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return {"seconds": min(times[1:]), "peak_bytes": peak}


def _measure_in_subprocess(case, num_classes, args) -> dict:
    command = [
        sys.executable,
        __file__,
        "--run-case",
        case,
        "--classes",
        str(num_classes),
        "--batch",
        str(args.batch),
        "--dim",
        str(args.dim),
        "--repeats",
        str(args.repeats),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"case {case} at C={num_classes} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _ratio(result: dict, other: dict | None, key: str = "seconds") -> str:
    return "–" if other is None else f"{result[key] / other[key]:.2f}"


def _machine_description(device: str, threads: int) -> str:
    import torch

    if threads:
        torch.set_num_threads(threads)

    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{model}, {torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads per case (0: torch's default); 1 is robust on a busy shared machine",
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=list(CASES),
        default=[case for case in CASES if case not in EXTRA_CASES],
        help=f"cases to run; {', '.join(EXTRA_CASES)} (with λ·R_sm) only when named here",
    )
    parser.add_argument("--run-case", choices=list(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.run_case:
        result = run_case(
            args.run_case,
            args.classes[0],
            args.batch,
            args.dim,
            args.repeats,
            args.device,
            args.threads,
        )
        print(json.dumps(result))
        return

    print(f"Machine: {_machine_description(args.device, args.threads)}")
    print(
        f"batch {args.batch}, d = {args.dim}, fwd+bwd best of {args.repeats} after a warm-up, "
        f"each case in a fresh subprocess; memory = "
        + ("max_memory_allocated" if args.device == "cuda" else "peak RSS above post-import RSS")
        + "\n"
    )
    print(
        "| C | case | time (ms) | × PML ArcFace | × floor | vs matching PML | peak mem (MB) "
        "| mem × PML ArcFace |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for num_classes in args.classes:
        results = {case: _measure_in_subprocess(case, num_classes, args) for case in args.cases}
        arcface = results.get("pml-arcface")
        floor = results.get("floor")
        for case, result in results.items():
            label, reference = CASES[case]
            seconds, megabytes = result["seconds"], result["peak_bytes"] / 2**20

            versus = _ratio(result, results.get(reference)) if reference else "–"
            print(
                f"| {num_classes:,} | {label} | {seconds * 1e3:.0f} | {_ratio(result, arcface)} "
                f"| {_ratio(result, floor)} | {versus} | {megabytes:.0f} "
                f"| {_ratio(result, arcface, 'peak_bytes')} |"
            )


if __name__ == "__main__":
    main()
