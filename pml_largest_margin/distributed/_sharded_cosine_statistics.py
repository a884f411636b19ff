"""Exact per-sample softmax statistics over classes split across ranks.

Each rank scores the whole gathered batch against its own classes only, with the two paths of
:mod:`pml_largest_margin.losses.fused` on its columns: ``memory="buffer"`` keeps one (N, C_local)
buffer, turned into the kernel's exponentials in place in forward and only read in backward
(:func:`~pml_largest_margin.losses.fused.buffer_gradients`); ``memory="stream"`` visits the
columns in blocks with the online log-sum-exp and recomputes each block's cosines in backward, so
nothing of size N × C_local is kept; ``"auto"`` streams when the buffer would exceed
``BUFFER_LIMIT_BYTES``. Nothing of size N × C, and no normalised copy of W, is formed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from ..losses.fused import (
    DEFAULT_MEMORY,
    buffer_gradients,
    buffer_statistics,
    inverse_column_norms,
    kept_stream_blocks,
    stream_block_columns,
    stream_gradients,
    stream_statistics,
    uses_stream,
)


class ShardedCosineStatistics(NamedTuple):
    """Per-sample quantities over all classes of all ranks, identical on every rank, shape (N,)."""

    non_target_logsumexp: torch.Tensor  # log Σ_{j≠y_i} exp(s·cos_ij)
    target_cosine: torch.Tensor  # cos_{i,y_i}, taken from the rank that owns class y_i
    non_target_max: torch.Tensor  # max_{j≠y_i} cos_ij (differentiable only with track_max)


class _ShardedCosineStatisticsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, unit_embeddings, weights, local_targets, scale, group, track_max, memory):
        compute_dtype = torch.promote_types(
            torch.promote_types(unit_embeddings.dtype, weights.dtype), torch.float32
        )
        ctx.scale, ctx.group, ctx.track_max = scale, group, track_max
        ctx.input_dtypes = (unit_embeddings.dtype, weights.dtype)
        ctx.block_columns = None
        if uses_stream(memory, unit_embeddings.shape[0], weights.shape[1], compute_dtype):
            ctx.block_columns = stream_block_columns(
                unit_embeddings.shape[0], weights.device, compute_dtype
            )
            kept_blocks = kept_stream_blocks(
                memory, unit_embeddings.shape[0], ctx.block_columns, compute_dtype
            )
        with torch.autocast(device_type=unit_embeddings.device.type, enabled=False):
            embeddings = unit_embeddings.to(compute_dtype)
            prototypes = weights.to(compute_dtype)
            inverse_norms, clamped = inverse_column_norms(prototypes)
            # Kept for backward: the buffer, or the last blocks' products when streaming.
            if ctx.block_columns is None:
                # Shifted by the maxima over all ranks, all-reduced between amax and exp.
                non_target_max, local_sums, target_part, nearest, buffer = buffer_statistics(
                    embeddings, prototypes, inverse_norms, local_targets, scale, track_max,
                    lambda maxima: dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group),
                )  # fmt: skip
                kept = (buffer,)
            else:
                local_max, local_sums, target_part, candidates, kept = stream_statistics(
                    embeddings, prototypes, inverse_norms, local_targets, scale,
                    ctx.block_columns, track_max, kept_blocks,
                )  # fmt: skip
                non_target_max = local_max.clone()
                dist.all_reduce(non_target_max, op=dist.ReduceOp.MAX, group=group)
                # A rank without non-target columns for a row has max −inf and sum 0: it adds
                # nothing.
                local_sums.mul_(local_max.sub(non_target_max).mul_(scale).exp_())
                if track_max:
                    rows, columns, values = candidates
                    maxima = values == non_target_max[rows]
                    nearest = (rows[maxima], columns[maxima])
            # Both paths make the same collectives with the same rows in the same order, so
            # ranks may take different paths.
            local = [target_part]
            if track_max:
                # amax's gradient is shared evenly among tied maxima: count them on all ranks.
                ties = torch.bincount(nearest[0], minlength=embeddings.shape[0])
                local.append(ties.to(compute_dtype))
            else:
                nearest = ()
            local.append(local_sums)
            sums = torch.stack(local)
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
            target_cosine, exponential_sum = sums[0], sums[-1]
            logsumexp = non_target_max * scale + torch.log(exponential_sum)
        ctx.save_for_backward(
            embeddings,
            prototypes,
            inverse_norms,
            clamped,
            local_targets,
            non_target_max,
            exponential_sum,
            sums[1] if track_max else None,
            *nearest,
            *kept,
        )
        if not track_max:
            ctx.mark_non_differentiable(non_target_max)
        return logsumexp, target_cosine, non_target_max

    @staticmethod
    def backward(ctx, grad_logsumexp, grad_target, grad_max):
        (embeddings, prototypes, inverse_norms, clamped, local_targets, non_target_max,
         exponential_sum, ties, *rest) = ctx.saved_tensors  # fmt: skip
        nearest, kept = rest[: 2 * ctx.track_max], tuple(rest[2 * ctx.track_max :])
        need_embeddings, need_weights = ctx.needs_input_grad[:2]
        row_factor = grad_logsumexp * ctx.scale / exponential_sum
        if ctx.track_max:
            rows, columns = nearest
            nearest = (rows, columns, (grad_max / ties)[rows])
        else:
            nearest = None
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            if ctx.block_columns is not None:
                grad_embeddings, grad_weights = stream_gradients(
                    embeddings, prototypes, inverse_norms, clamped, local_targets, ctx.scale,
                    non_target_max, row_factor, grad_target, nearest, ctx.block_columns, kept,
                    need_embeddings, need_weights,
                )  # fmt: skip
            else:
                grad_embeddings, grad_weights = buffer_gradients(
                    embeddings, prototypes, inverse_norms, clamped, local_targets, kept[0],
                    row_factor, grad_target, nearest, need_embeddings, need_weights,
                )  # fmt: skip
        if need_embeddings:
            dist.all_reduce(grad_embeddings, op=dist.ReduceOp.SUM, group=ctx.group)
            grad_embeddings = grad_embeddings.to(ctx.input_dtypes[0])
        if need_weights:
            grad_weights = grad_weights.to(ctx.input_dtypes[1])
        return grad_embeddings, grad_weights, None, None, None, None, None


def sharded_cosine_statistics(
    unit_embeddings: torch.Tensor,
    weights: torch.Tensor,
    local_targets: torch.Tensor,
    scale: float,
    group=None,
    track_max: bool = False,
    memory: str = DEFAULT_MEMORY,
) -> ShardedCosineStatistics:
    """Statistics of ``s·cos(ẑ_i, w_j)`` over the classes of all ranks.

    ``unit_embeddings`` (N, d): the gathered, L2-normalised batch, the same on every rank.
    ``weights`` (d, K): this rank's prototype columns. ``local_targets`` (N,): the column of
    ``weights`` holding sample i's class, or -1 where another rank owns it. Gradients follow the
    replicated-objective convention of ``_collectives``: the embedding gradient is summed over
    ranks, the weight gradient is this rank's exact slice. ``track_max`` makes the non-target
    maximum differentiable (for the sample-margin regularizer), at the cost of a boolean N × K mask
    on the buffer path. ``memory``: ``"buffer"``, ``"stream"`` or ``"auto"`` (see the module
    docstring), decided on each rank for its own columns (the paths exchange the same collectives,
    so ranks may take different ones).
    """
    return ShardedCosineStatistics(
        *_ShardedCosineStatisticsFunction.apply(
            unit_embeddings, weights, local_targets, scale, group, track_max, memory
        )
    )
