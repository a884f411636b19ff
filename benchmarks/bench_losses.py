"""Forward+backward time and peak memory of the margin-softmax losses against PML's own classes.

Every case (loss x number of classes) runs in a fresh Python process (``_harness``), so that memory
left over by one case cannot hide or inflate another. A case builds the loss (W initialised by the
loss's own ``weight_init_func``), a batch of embeddings that requires grad and random labels, runs
one warm-up step, then ``--repeats`` timed steps of ``loss(embeddings, labels).backward()`` with
gradients reset to None before each step (as ``optimizer.zero_grad()`` does), and reports the best
step; with ``--rounds R`` every case runs R times, the cases interleaved round by round (a change
of machine load hits all of them alike), and the best round counts. With ``--sgd-momentum`` a step also applies ``torch.optim.SGD(momentum=0.9)`` to W; with
``--repeats 0`` a single cold step is timed (no warm-up: for cases that only just fit).

Memory on CPU is the peak resident set size of the process minus its resident size after the
imports, so it counts W, its gradient, the optimiser state, the batch and every temporary of the
step; on CUDA it is ``torch.cuda.max_memory_allocated``. "beyond W" subtracts W itself, its
gradient and the momentum buffer (where there are), leaving what the loss's own algorithm costs.
The floor is the three matrix products that any implementation of these losses needs (``ẑ W``, the
cosine gradient times ``W^T``, ``ẑ^T`` times it) timed alone, without autograd (it forms the
batch × classes matrix, so it is not run where that would not fit).

``--slice-check K`` (streaming cases) also computes, before timing, the loss on the first K
classes of the case's W with the streaming and the buffer path (labels modulo K, no gradient) and
reports both and their difference: the exactness check for class counts the buffer cannot reach.

    flock /tmp/bench.lock env PYTHONPATH=. python benchmarks/bench_losses.py
    env PYTHONPATH=. python benchmarks/bench_losses.py --classes 2000000 --dim 128 \
        --cases floor lm-stream lm-buffer
    env PYTHONPATH=. python benchmarks/bench_losses.py --classes 10000000 --dim 128 \
        --cases lm-stream --sgd-momentum --repeats 0 --slice-check 1000000 --min-available-gib 19
    python benchmarks/bench_losses.py --device cuda --classes 1000000 --dim 128
"""

from __future__ import annotations

import argparse
import math

from _harness import (
    best_result,
    best_seconds,
    current_rss_bytes,
    machine_description,
    measure_in_fresh_process,
    peak_rss_bytes,
    ratio,
    run_case_if_asked,
)

# case -> (label, the PML case it is compared with)
CASES = {
    "floor": ("three matrix products", None),
    "lm": ("LargestMarginSoftmaxLoss", None),
    "lm-stream": ("LargestMarginSoftmaxLoss memory=stream", None),
    "lm-buffer": ("LargestMarginSoftmaxLoss memory=buffer", None),
    "gm-normface": ("GM-Softmax normface", "pml-normalizedsoftmax"),
    "gm-cosface": ("GM-Softmax cosface", "pml-cosface"),
    "gm-arcface": ("GM-Softmax arcface", "pml-arcface"),
    "gm-arcface-stream": ("GM-Softmax arcface memory=stream", "pml-arcface"),
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
EXTRA_CASES = ("lm-buffer", "lm-rsm", "pml-arcface-rsm")


def _build_loss(case: str, num_classes: int, embedding_size: int):
    from pytorch_metric_learning import losses as pml_losses

    from pml_largest_margin.losses import GeneralizedMarginSoftmaxLoss, LargestMarginSoftmaxLoss
    from pml_largest_margin.regularizers import (
        SampleMarginRegularizer,
        with_sample_margin_regularizer,
    )

    args = (num_classes, embedding_size)
    # The class margin of W costs O(C²d): never part of a training step's cost here.
    fast = {"validate_inputs": False, "record_class_margin": False}
    sample_margin = {
        "sample_margin_regularizer": SampleMarginRegularizer(),
        "sample_margin_reg_weight": SAMPLE_MARGIN_WEIGHT,
    }

    def preset(name, **kwargs):
        return lambda: GeneralizedMarginSoftmaxLoss.preset(
            name, *args, scale=SCALE, **fast, **kwargs
        )

    builders = {
        "lm": lambda: LargestMarginSoftmaxLoss(*args, scale=SCALE, **fast),
        "lm-stream": lambda: LargestMarginSoftmaxLoss(*args, scale=SCALE, memory="stream", **fast),
        "lm-buffer": lambda: LargestMarginSoftmaxLoss(*args, scale=SCALE, memory="buffer", **fast),
        "gm-normface": preset("normface"),
        "gm-cosface": preset("cosface", margin=COS_MARGIN),
        "gm-arcface": preset("arcface", margin=ARC_MARGIN),
        "gm-arcface-stream": preset("arcface", margin=ARC_MARGIN, memory="stream"),
        "gm-sphereface": preset("sphereface", margin=SPHERE_MARGIN),
        "pml-normalizedsoftmax": lambda: pml_losses.NormalizedSoftmaxLoss(
            *args, temperature=1 / SCALE
        ),
        "pml-cosface": lambda: pml_losses.CosFaceLoss(*args, margin=COS_MARGIN, scale=SCALE),
        "pml-arcface": lambda: pml_losses.ArcFaceLoss(
            *args, margin=math.degrees(ARC_MARGIN), scale=SCALE
        ),
        "pml-sphereface": lambda: pml_losses.SphereFaceLoss(*args, margin=SPHERE_MARGIN, scale=1.0),
        "lm-rsm": lambda: LargestMarginSoftmaxLoss(*args, scale=SCALE, **fast, **sample_margin),
        "pml-arcface-rsm": lambda: with_sample_margin_regularizer(pml_losses.ArcFaceLoss)(
            *args, margin=math.degrees(ARC_MARGIN), scale=SCALE, **sample_margin
        ),
    }
    return builders[case]()


def _slice_check(loss_fn, embeddings, labels, num_classes: int) -> dict:
    """The loss's mean on the first ``num_classes`` columns of W by the streaming and the buffer
    path (labels modulo ``num_classes``, no gradient)."""
    import torch

    values = {}
    memory = loss_fn.memory
    with torch.no_grad():
        for loss_fn.memory in ("stream", "buffer"):
            losses, _ = loss_fn.per_sample_losses(
                embeddings, loss_fn.W[:, :num_classes], labels % num_classes
            )
            values[loss_fn.memory] = float(losses.mean())
    loss_fn.memory = memory
    return {
        "slice_classes": num_classes,
        "slice_stream_loss": values["stream"],
        "slice_buffer_loss": values["buffer"],
        "slice_difference": abs(values["stream"] - values["buffer"]),
    }


def run_case(
    case: str,
    num_classes: int,
    batch: int,
    dim: int,
    repeats: int,
    device: str,
    threads: int,
    sgd_momentum: bool = False,
    slice_check: int = 0,
) -> dict:
    """Measure one case in this process (started fresh by the harness)."""
    # Imported before the baseline, so that the modules' own memory does not count.
    import pytorch_metric_learning.losses  # noqa: F401
    import torch

    import pml_largest_margin.losses  # noqa: F401

    if threads:
        torch.set_num_threads(threads)
    baseline = current_rss_bytes()
    torch.manual_seed(0)
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    embeddings = torch.randn(batch, dim, device=device, requires_grad=True)
    extra = {}
    if case == "floor":
        weights = torch.randn(dim, num_classes, device=device)
        unit = torch.nn.functional.normalize(embeddings.detach(), dim=1)
        tensors_of_W = 1

        def step():
            cosines = unit @ weights
            _ = cosines @ weights.t()
            _ = unit.t() @ cosines
    else:
        loss_fn = _build_loss(case, num_classes, dim).to(device)
        if slice_check:
            extra = _slice_check(loss_fn, embeddings.detach(), labels, slice_check)
        optimizer = torch.optim.SGD([loss_fn.W], lr=0.1, momentum=0.9, foreach=False)
        tensors_of_W = 3 if sgd_momentum else 2

        def step():
            embeddings.grad = None
            loss_fn.W.grad = None
            loss = loss_fn(embeddings, labels)
            loss.backward()
            if sgd_momentum:
                optimizer.step()
            extra["loss"] = float(loss)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if repeats:
        seconds = best_seconds(step, repeats, synchronize)
    else:
        seconds = best_seconds(lambda: None, 1) + _cold_seconds(step, synchronize)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss_bytes() - baseline
    W_bytes = num_classes * dim * 4
    return {
        "seconds": seconds,
        "peak_bytes": peak,
        "beyond_W_bytes": peak - tensors_of_W * W_bytes,
        **extra,
    }


def _cold_seconds(step, synchronize) -> float:
    """One timed call of ``step`` without a warm-up."""
    import time

    synchronize()
    start = time.perf_counter()
    step()
    synchronize()
    return time.perf_counter() - start


def _available_gib() -> float:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return math.inf


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="0: one cold step, no warm-up")
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
        help=f"cases to run; {', '.join(EXTRA_CASES)} only when named here",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="fresh processes per case, the cases interleaved round by round; the best round counts",
    )
    parser.add_argument("--sgd-momentum", action="store_true", help="add an SGD-momentum step")
    parser.add_argument("--slice-check", type=int, default=0, metavar="K")
    parser.add_argument(
        "--min-available-gib",
        type=float,
        default=0.0,
        help="skip a case when the machine has less memory available than this when it starts",
    )
    if run_case_if_asked(run_case, argv):
        return
    args = parser.parse_args(argv)

    print(f"Machine: {machine_description(args.device)}")
    memory = "max_memory_allocated" if args.device == "cuda" else "peak RSS above post-import RSS"
    print(
        f"batch {args.batch}, d = {args.dim}, fwd+bwd{' + SGD-momentum step' if args.sgd_momentum else ''}, "
        + (f"best of {args.repeats} after a warm-up" if args.repeats else "one cold step")
        + f", each case in a fresh process, best of {args.rounds} interleaved round(s); "
        + f"memory = {memory}\n"
    )
    print(
        "| C | case | time (ms) | × PML ArcFace | × floor | vs matching PML | peak mem (MB) "
        "| beyond W (MB) | mem × PML ArcFace |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    checks = []
    for num_classes in args.classes:
        results = {}
        for _ in range(args.rounds):
            for case in args.cases:
                available = _available_gib()
                if available < args.min_available_gib:
                    print(
                        f"| {num_classes:,} | {CASES[case][0]} | skipped: "
                        f"{available:.1f} GiB available |"
                    )
                    continue
                result = measure_in_fresh_process(
                    __file__,
                    case=case,
                    num_classes=num_classes,
                    batch=args.batch,
                    dim=args.dim,
                    repeats=args.repeats,
                    device=args.device,
                    threads=args.threads,
                    sgd_momentum=args.sgd_momentum,
                    slice_check=args.slice_check if case.endswith("-stream") else 0,
                )
                results[case] = best_result(results.get(case), result)
        arcface, floor = results.get("pml-arcface"), results.get("floor")
        for case, result in results.items():
            label, reference = CASES[case]
            matching = results.get(reference) if reference else None
            print(
                f"| {num_classes:,} | {label} | {result['seconds'] * 1e3:.0f} "
                f"| {_ratio(result, arcface)} | {_ratio(result, floor)} | {_ratio(result, matching)} "
                f"| {result['peak_bytes'] / 2**20:.0f} | {result['beyond_W_bytes'] / 2**20:.0f} "
                f"| {_ratio(result, arcface, 'peak_bytes')} |"
            )
            if "slice_classes" in result:
                checks.append((num_classes, label, result))
    for num_classes, label, result in checks:
        print(
            f"\nslice check ({label}, C = {num_classes:,}, first {result['slice_classes']:,} "
            f"classes): stream {result['slice_stream_loss']:.12f}, buffer "
            f"{result['slice_buffer_loss']:.12f}, |difference| {result['slice_difference']:.1e}"
        )


def _ratio(result: dict, reference: dict | None, key: str = "seconds") -> str:
    return ratio(result[key], None if reference is None else reference[key])


if __name__ == "__main__":
    main()
