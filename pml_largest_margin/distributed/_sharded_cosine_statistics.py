"""Exact per-sample softmax statistics over classes split across ranks.

Each rank holds the cosines of the whole gathered batch against its own classes only, in one
(N, C_local) buffer that is turned into exponentials in place in forward and into the cosine
gradient in place in backward. Nothing of size N × C, and no normalised copy of W, is formed.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from ..losses.fused import NORM_EPS, column_dots


class ShardedCosineStatistics(NamedTuple):
    """Per-sample quantities over all classes of all ranks, identical on every rank, shape (N,)."""

    non_target_logsumexp: torch.Tensor  # log Σ_{j≠y_i} exp(s·cos_ij)
    target_cosine: torch.Tensor  # cos_{i,y_i}, taken from the rank that owns class y_i
    non_target_max: torch.Tensor  # max_{j≠y_i} cos_ij (differentiable only with track_max)


class _ShardedCosineStatisticsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, unit_embeddings, weights, local_targets, scale, group, track_max):
        compute_dtype = torch.promote_types(
            torch.promote_types(unit_embeddings.dtype, weights.dtype), torch.float32
        )
        with torch.autocast(device_type=unit_embeddings.device.type, enabled=False):
            embeddings = unit_embeddings.to(compute_dtype)
            prototypes = weights.to(compute_dtype)
            norms = torch.linalg.vector_norm(prototypes, dim=0).clamp_min_(NORM_EPS)
            cosines = embeddings @ prototypes
            cosines.div_(norms)
            rows = torch.nonzero(local_targets >= 0).squeeze(1)
            columns = local_targets[rows]
            target_part = cosines.new_zeros(cosines.shape[0])
            target_part[rows] = cosines[rows, columns]
            cosines[rows, columns] = -math.inf
            non_target_max = cosines.amax(dim=1)
            dist.all_reduce(non_target_max, op=dist.ReduceOp.MAX, group=group)
            local_sums = [target_part]
            tie_mask = None
            if track_max:
                # amax's gradient is shared evenly among tied maxima; count them on all ranks.
                tie_mask = cosines == non_target_max[:, None]
                local_sums.append(tie_mask.sum(dim=1, dtype=compute_dtype))
            exponentials = cosines.sub_(non_target_max[:, None]).mul_(scale).exp_()
            local_sums.append(exponentials.sum(dim=1))
            sums = torch.stack(local_sums)
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
            target_cosine, exponential_sum = sums[0], sums[-1]
            logsumexp = non_target_max * scale + torch.log(exponential_sum)
        ctx.scale, ctx.group, ctx.track_max = scale, group, track_max
        ctx.input_dtypes = (unit_embeddings.dtype, weights.dtype)
        ctx.save_for_backward(
            embeddings,
            prototypes,
            norms,
            exponentials,
            local_targets,
            exponential_sum,
            sums[1] if track_max else None,
            tie_mask,
        )
        if not track_max:
            ctx.mark_non_differentiable(non_target_max)
        return logsumexp, target_cosine, non_target_max

    @staticmethod
    def backward(ctx, grad_logsumexp, grad_target, grad_max):
        (embeddings, prototypes, norms, exponentials, local_targets, exponential_sum, ties,
         tie_mask) = ctx.saved_tensors  # fmt: skip
        # The exponentials are not needed again: they become the cosine gradient in place
        # (a second backward through this graph fails on autograd's version check).
        grads = exponentials.mul_((grad_logsumexp * ctx.scale / exponential_sum)[:, None])
        rows = torch.nonzero(local_targets >= 0).squeeze(1)
        grads[rows, local_targets[rows]] += grad_target[rows]
        if ctx.track_max:
            grads.addcmul_(tie_mask.to(grads.dtype), (grad_max / ties)[:, None])
        grads.div_(norms)
        grad_embeddings = grad_weights = None
        if ctx.needs_input_grad[0]:
            grad_embeddings = grads @ prototypes.t()
            dist.all_reduce(grad_embeddings, op=dist.ReduceOp.SUM, group=ctx.group)
            grad_embeddings = grad_embeddings.to(ctx.input_dtypes[0])
        if ctx.needs_input_grad[1]:
            # Through ŵ = w/‖w‖ the gradient is projected: (g − ŵ(ŵ·g))/‖w‖.
            grad_weights = embeddings.t() @ grads
            radial = column_dots(grad_weights, prototypes).div_(norms.square())
            grad_weights.addcmul_(prototypes, radial[None, :], value=-1)
            grad_weights = grad_weights.to(ctx.input_dtypes[1])
        return grad_embeddings, grad_weights, None, None, None, None


def sharded_cosine_statistics(
    unit_embeddings: torch.Tensor,
    weights: torch.Tensor,
    local_targets: torch.Tensor,
    scale: float,
    group=None,
    track_max: bool = False,
) -> ShardedCosineStatistics:
    """Statistics of ``s·cos(ẑ_i, w_j)`` over the classes of all ranks.

    ``unit_embeddings`` (N, d): the gathered, L2-normalised batch, the same on every rank.
    ``weights`` (d, K): this rank's prototype columns. ``local_targets`` (N,): the column of
    ``weights`` holding sample i's class, or -1 where another rank owns it. Gradients follow the
    replicated-objective convention of ``_collectives``: the embedding gradient is summed over
    ranks, the weight gradient is this rank's exact slice. ``track_max`` makes the non-target
    maximum differentiable (for the sample-margin regularizer) at the cost of a boolean N × K mask.
    """
    return ShardedCosineStatistics(
        *_ShardedCosineStatisticsFunction.apply(
            unit_embeddings, weights, local_targets, scale, group, track_max
        )
    )
