"""W's gradient under PML's DistributedLossWrapper, in two gloo processes on CPU.

Every rank computes the loss over the gathered global batch (other ranks' embeddings carry no
gradient) and the wrapper multiplies it by the world size. So W.grad is identical on every rank
and equals world_size × the gradient of the global-batch mean loss, while each rank's embedding
gradient is its own slice of that same gradient × world_size.
"""

import pytest
import torch
from _distributed_harness import run_in_workers
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

from pml_largest_margin.losses import GeneralizedMarginSoftmaxLoss, LargestMarginSoftmaxLoss

WORLD_SIZE, PER_RANK, NUM_CLASSES, DIM = 2, 5, 7, 4
KINDS = ("lm", "gm")


def make_loss(kind):
    torch.manual_seed(0)
    if kind == "lm":
        return LargestMarginSoftmaxLoss(NUM_CLASSES, DIM, scale=8.0)
    return GeneralizedMarginSoftmaxLoss.preset("cosface", NUM_CLASSES, DIM, scale=8.0)


def global_batch():
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn(WORLD_SIZE * PER_RANK, DIM, generator=generator)
    return embeddings, torch.randint(0, NUM_CLASSES, (WORLD_SIZE * PER_RANK,), generator=generator)


def check_wrapper_gradients(rank, world_size):
    torch.set_num_threads(1)
    embeddings, labels = global_batch()
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    outcome = {}
    for kind in KINDS:
        loss_fn = make_loss(kind)
        local = embeddings[rows].clone().requires_grad_(True)
        loss = DistributedLossWrapper(loss_fn)(local, labels[rows])
        loss.backward()
        outcome[kind] = (loss.item(), local.grad.clone(), loss_fn.W.grad.clone())
    return outcome


def test_distributed_loss_wrapper_gradients():
    per_rank = run_in_workers([check_wrapper_gradients], world_size=WORLD_SIZE)
    outcomes = {rank: per_rank[rank]["check_wrapper_gradients"] for rank in range(WORLD_SIZE)}
    for outcome in outcomes.values():
        if isinstance(outcome, Exception):
            raise outcome

    for kind in KINDS:
        loss_fn = make_loss(kind)
        embeddings, labels = global_batch()
        embeddings.requires_grad_(True)
        single = loss_fn(embeddings, labels)
        single.backward()
        weight_grads = []
        for rank, outcome in outcomes.items():
            loss, embedding_grad, weight_grad = outcome[kind]
            assert loss == pytest.approx(WORLD_SIZE * single.item(), rel=1e-5)
            torch.testing.assert_close(weight_grad, WORLD_SIZE * loss_fn.W.grad)
            rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            torch.testing.assert_close(embedding_grad, WORLD_SIZE * embeddings.grad[rows])
            weight_grads.append(weight_grad)
        assert len(weight_grads) == WORLD_SIZE
        torch.testing.assert_close(weight_grads[0], weight_grads[1])
