"""Class-parallel LM-Softmax (or GM-Softmax) training on synthetic data.

    torchrun --nproc_per_node=2 examples/torchrun_class_parallel.py            # gloo on CPU
    torchrun --nproc_per_node=2 examples/torchrun_class_parallel.py --loss arcface
    torchrun --nproc_per_node=8 examples/torchrun_class_parallel.py --classes 1000000  # NCCL

The backbone is replicated with DDP; the prototypes W are split by class over the ranks and are
NOT wrapped in DDP: each rank updates its own slice with the exact gradient.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from pml_largest_margin.distributed import (
    ClassParallelGeneralizedMarginSoftmaxLoss,
    ClassParallelLargestMarginSoftmaxLoss,
    ClassParallelZeroCentroidRegularizer,
)
from pml_largest_margin.regularizers import SampleMarginRegularizer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=10_000)
    parser.add_argument("--embedding-size", type=int, default=128)
    parser.add_argument("--batch-per-rank", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sample-rate", type=float, default=1.0)
    parser.add_argument(
        "--loss",
        default="lm",
        choices=["lm", *ClassParallelGeneralizedMarginSoftmaxLoss.preset_names()],
        help="LM-Softmax, or a GM-Softmax preset",
    )
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        train(args, device)
        # No rank tears the group down while another still has collectives in flight.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def train(args, device):
    rank = dist.get_rank()
    torch.manual_seed(rank)

    backbone = torch.nn.Sequential(
        torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, args.embedding_size)
    ).to(device)
    model = torch.nn.parallel.DistributedDataParallel(backbone)
    shared = {
        "sample_rate": args.sample_rate,
        "sample_margin_regularizer": SampleMarginRegularizer(),
        "sample_margin_reg_weight": 0.1,
        "weight_regularizer": ClassParallelZeroCentroidRegularizer(),
    }
    if args.loss == "lm":
        loss_fn = ClassParallelLargestMarginSoftmaxLoss(
            args.classes, args.embedding_size, scale=32.0, **shared
        )
    else:
        loss_fn = ClassParallelGeneralizedMarginSoftmaxLoss.preset(
            args.loss, args.classes, args.embedding_size, **shared
        )
    loss_fn = loss_fn.to(device)
    optimizer = torch.optim.SGD([*model.parameters(), *loss_fn.parameters()], lr=0.1, momentum=0.9)
    # A synthetic problem: each class is a random direction in input space.
    class_inputs = torch.randn(args.classes, 32, generator=torch.Generator().manual_seed(0))
    for step in range(args.steps):
        labels = torch.randint(args.classes, (args.batch_per_rank,))
        inputs = class_inputs[labels] + 0.1 * torch.randn(args.batch_per_rank, 32)
        loss = loss_fn(model(inputs.to(device)), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if rank == 0 and step % 5 == 0:
            print(f"step {step}: loss {loss.item():.4f}, classes on rank 0: {loss_fn.class_range}")


if __name__ == "__main__":
    main()
