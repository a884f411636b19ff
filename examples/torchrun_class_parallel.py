"""Class-parallel LM-Softmax (or GM-Softmax) training on synthetic data.

    torchrun --nproc_per_node=2 examples/torchrun_class_parallel.py            # gloo on CPU
    torchrun --nproc_per_node=2 examples/torchrun_class_parallel.py --loss arcface
    torchrun --nproc_per_node=8 examples/torchrun_class_parallel.py --classes 1000000  # NCCL
    torchrun --nproc_per_node=2 examples/torchrun_class_parallel.py --checkpoint loss.pt
    torchrun --nproc_per_node=3 examples/torchrun_class_parallel.py --checkpoint loss.pt  # resumes the loss

The backbone is replicated with DDP; the prototypes W are split by class over the ranks and are
NOT wrapped in DDP: each rank updates its own slice with the exact gradient. ``--checkpoint``
saves the loss as one world-size-free (single-process) state dict, and resumes from it on any
number of ranks.
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
    consolidate_class_parallel_checkpoint,
    shard_class_parallel_checkpoint,
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
    parser.add_argument(
        "--checkpoint",
        help="resume the loss from this file if it exists, and save it there at the end",
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
    if args.checkpoint and os.path.exists(args.checkpoint):
        full = torch.load(args.checkpoint, map_location=device)
        loss_fn.load_state_dict(shard_class_parallel_checkpoint(full, rank, dist.get_world_size()))
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
    if args.checkpoint:
        save_consolidated(loss_fn, args.checkpoint)


def save_consolidated(loss_fn, path):
    """Gather every rank's slice on rank 0 and save one state dict that any world size loads."""
    state = {
        key: value.cpu() if isinstance(value, torch.Tensor) else value
        for key, value in loss_fn.state_dict().items()
    }
    shards = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(state, shards, dst=0)
    if dist.get_rank() == 0:
        torch.save(consolidate_class_parallel_checkpoint(shards), path)
        print(f"saved the loss's {loss_fn.num_classes} prototypes to {path}")


if __name__ == "__main__":
    main()
