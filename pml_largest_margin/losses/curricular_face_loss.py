"""CurricularFace: hard negatives weighted up as training progresses (Huang et al., CVPR 2020)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ._angles import additive_angular_margin, arccos
from .base_margin_head_loss import BaseMarginHeadLoss, CosineStatistics
from .base_margin_softmax_loss import DEFAULT_SCALE
from .functional import generalized_margin_softmax_head
from .fused import (
    NORM_EPS,
    clamped_normalisation,
    cosine_gradients,
    kept_stream_blocks,
    stream_block_columns,
    uses_stream,
)

# Elements per row block of the buffer while the hard negatives are modulated (block temporaries
# of 16 MB in float32, whatever N × C).
_BLOCK_ELEMENTS = 2**22


def _unit_rows_backward(grad_unit, unit, inverse_norms, clamped):
    """Gradient through ``x/max(‖x‖, eps)`` for rows: a projection, plain scaling where clamped."""
    radial = (unit * grad_unit).sum(dim=1, keepdim=True).masked_fill_(clamped[:, None], 0.0)
    return (grad_unit - unit * radial) * inverse_norms[:, None]


def _all_reduce(values: torch.Tensor, op, group) -> torch.Tensor:
    """``values`` reduced in place over ``group``; unchanged for a single process (``None``)."""
    if group is not None:
        dist.all_reduce(values, op=op, group=group)
    return values


def _block_cosines(unit, weights, inverse_weight_norms, targets, start, stop):
    """Cosines of the columns ``start:stop`` with the targets among them set to −inf, and the
    target cosines of the rows whose target lies there (0 for the others)."""
    cosines = unit @ weights[:, start:stop]
    cosines.mul_(inverse_weight_norms[start:stop])
    rows = ((targets >= start) & (targets < stop)).nonzero().squeeze(1)
    columns = targets[rows] - start
    target = cosines.new_zeros(cosines.shape[0])
    target[rows] = cosines[rows, columns]
    cosines[rows, columns] = -math.inf
    return cosines, target


def _modulated_logits(cosines, thresholds, hardness):
    """``φ = cos·(T + cos)`` on the hard negatives (``cos > c_i``), ``cos`` elsewhere (a new
    tensor), and the mask of the others (the target's −inf among them)."""
    soft = cosines <= thresholds[:, None]
    logits = torch.add(cosines, hardness).mul_(cosines)
    return torch.where(soft, cosines, logits, out=logits), soft


def _exponentials_times_slopes(cosines, logits, soft, hardness, shift, scale, inverse_norms):
    """``exp(s·(φ − shift))·φ'/‖w_j‖`` written over ``cosines`` (``logits`` is consumed), with
    the slopes ``φ' = T + 2·cos`` on the hard negatives and 1 elsewhere; returns the row sums of
    the exponentials. In place throughout: no block-sized temporary beyond ``logits``."""
    exponentials = logits.sub_(shift[:, None]).mul_(scale).exp_()
    sums = exponentials.sum(dim=1)
    cosines.mul_(2).add_(hardness).masked_fill_(soft, 1.0)
    cosines.mul_(exponentials).mul_(inverse_norms)
    return sums


class _ModulatedNonTargetLogSumExp(torch.autograd.Function):
    """``u_i = log Σ_{j≠y_i} exp(s·φ_ij)``, ``φ_ij = cos_ij·(T + cos_ij)`` where ``cos_ij > c_i``,
    else ``cos_ij``; also ``t_i = cos_{i,y_i}`` and ``max_{j≠y_i} cos_ij`` (no gradient).

    The columns of ``weights`` are all classes (``group=None``) or this rank's share of them, with
    ``targets`` −1 for a sample whose class another rank holds; the per-row maxima and sums are
    then all-reduced over ``group``, every rank scaling its sums to the global maximum, and the
    unit-row gradient is summed over the ranks (the convention of
    :mod:`pml_largest_margin.distributed._collectives`).

    ``block_columns=None``: one (N, C) buffer holds the cosines, then, row block by row block,
    ``exp(s·(φ − m))·φ'/‖w_j‖`` with ``m`` the row maximum of ``φ`` on this rank, which is all
    the backward pass needs. Otherwise the columns are visited in blocks with an online
    log-sum-exp, and backward recomputes each block's exponentials except for the last
    ``kept_blocks`` blocks, whose cosines forward keeps. Either way the gradient on the
    cosines is ``r_i`` times those exponentials (``r_i = s·e^{s(m_i − M_i)}·∂/∂u_i / Σ_i``, M the
    global maximum), so backward is the fused kernel's two products per block and its
    :func:`~pml_largest_margin.losses.fused.cosine_gradients`. The thresholds ``c_i`` only select
    the hard negatives (a piecewise-constant choice) and get no gradient.
    """

    @staticmethod
    def forward(
        ctx, embeddings, weights, targets, thresholds, hardness, scale, group, columns, kept_blocks
    ):
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            (
                unit,
                inverse_embedding_norms,
                embedding_clamped,
                inverse_weight_norms,
                weight_clamped,
            ) = clamped_normalisation(embeddings, weights)
            num_rows, num_columns = unit.shape[0], weights.shape[1]
            nontarget_max = unit.new_full((num_rows,), -math.inf)
            logit_max = unit.new_full((num_rows,), -math.inf)
            row_sums = unit.new_zeros(num_rows)
            buffer, kept = None, []
            if columns is None:
                buffer, target = _block_cosines(
                    unit, weights, inverse_weight_norms, targets, 0, num_columns
                )
                rows_per_block = max(1, _BLOCK_ELEMENTS // max(1, num_columns))
                for start in range(0, num_rows, rows_per_block):
                    rows = slice(start, start + rows_per_block)
                    cosines = buffer[rows]
                    nontarget_max[rows] = cosines.amax(dim=1)
                    logits, soft = _modulated_logits(cosines, thresholds[rows], hardness)
                    logit_max[rows] = logits.amax(dim=1)
                    # A row with only its target here has maximum −inf: shift by 0 instead.
                    shift = logit_max[rows].nan_to_num(neginf=0.0)
                    row_sums[rows] = _exponentials_times_slopes(
                        cosines, logits, soft, hardness, shift, scale, inverse_weight_norms
                    )
            else:
                target = unit.new_zeros(num_rows)
                for start in range(0, num_columns, columns):
                    stop = min(start + columns, num_columns)
                    cosines, block_target = _block_cosines(
                        unit, weights, inverse_weight_norms, targets, start, stop
                    )
                    if start >= _kept_from(num_columns, columns, kept_blocks):
                        kept.append(cosines)  # only read from here on
                    target += block_target
                    torch.maximum(nontarget_max, cosines.amax(dim=1), out=nontarget_max)
                    logits, _ = _modulated_logits(cosines, thresholds, hardness)
                    new_max = torch.maximum(logit_max, logits.amax(dim=1))
                    shift = new_max.nan_to_num(neginf=0.0)
                    row_sums.mul_(logit_max.sub(shift).mul_(scale).exp_())
                    row_sums.add_(logits.sub_(shift[:, None]).mul_(scale).exp_().sum(dim=1))
                    logit_max = new_max
            global_max = _all_reduce(logit_max.clone(), dist.ReduceOp.MAX, group)
            _all_reduce(nontarget_max, dist.ReduceOp.MAX, group)
            rescale = logit_max.sub(global_max).mul_(scale).exp_()
            sums = _all_reduce(torch.stack([target, row_sums * rescale]), dist.ReduceOp.SUM, group)
            target, total = sums[0], sums[1]
            nontarget_lse = scale * global_max + total.log()

        ctx.scale, ctx.hardness, ctx.group, ctx.columns = scale, hardness, group, columns
        ctx.save_for_backward(
            unit,
            inverse_embedding_norms,
            embedding_clamped,
            weights,
            inverse_weight_norms,
            weight_clamped,
            targets,
            thresholds,
            buffer,
            logit_max,
            rescale / total,
            *kept,
        )
        ctx.mark_non_differentiable(nontarget_max)
        return nontarget_lse, target, nontarget_max

    @staticmethod
    def backward(ctx, grad_lse, grad_target, _grad_max):
        (unit, inverse_embedding_norms, embedding_clamped, weights, inverse_weight_norms,
         weight_clamped, targets, thresholds, buffer, logit_max,
         rescaled_inverse_sums, *kept) = ctx.saved_tensors  # fmt: skip
        grad_lse = torch.zeros_like(logit_max) if grad_lse is None else grad_lse
        grad_target = torch.zeros_like(logit_max) if grad_target is None else grad_target
        need_embeddings, need_weights = ctx.needs_input_grad[:2]
        row_factor = grad_lse * ctx.scale * rescaled_inverse_sums
        grad_embeddings = None
        with torch.autocast(device_type=unit.device.type, enabled=False):
            if buffer is not None:
                unit_part = buffer @ weights.t() if need_embeddings else None
                weight_part = (unit * row_factor[:, None]).t() @ buffer if need_weights else None
            else:
                unit_part, weight_part = _stream_products(
                    ctx, unit, weights, inverse_weight_norms, targets, thresholds, logit_max,
                    row_factor, need_embeddings, need_weights, kept,
                )  # fmt: skip
            grad_unit, grad_weights = cosine_gradients(
                unit, weights, inverse_weight_norms, weight_clamped, targets, row_factor,
                grad_target, None, unit_part, weight_part,
            )  # fmt: skip
            if need_embeddings:
                _all_reduce(grad_unit, dist.ReduceOp.SUM, ctx.group)
                grad_embeddings = _unit_rows_backward(
                    grad_unit, unit, inverse_embedding_norms, embedding_clamped
                )
        return grad_embeddings, grad_weights, None, None, None, None, None, None, None


def _kept_from(num_columns: int, columns: int, kept_blocks: int) -> int:
    """The first column of the last ``kept_blocks`` blocks of ``columns`` columns (the last block
    may be shorter); ``num_columns`` when none is kept."""
    num_blocks = -(-num_columns // columns)
    return min(num_columns, max(0, num_blocks - kept_blocks) * columns)


def _stream_products(ctx, unit, weights, inverse_weight_norms, targets, thresholds, logit_max,
                     row_factor, need_unit, need_weights, kept):  # fmt: skip
    """The buffer's two products with its blocks of columns recomputed (the last ones' cosines are
    ``kept``, copied): ``X W^T`` accumulated, ``(r∘ẑ)^T X`` written block by block."""
    unit_part = unit.new_zeros(unit.shape) if need_unit else None
    weight_part = torch.empty_like(weights) if need_weights else None
    scaled_unit_t = (unit * row_factor[:, None]).t()
    shift = logit_max.nan_to_num(neginf=0.0)
    kept_from = _kept_from(weights.shape[1], ctx.columns, len(kept))
    kept_cosines = iter(kept)
    for start in range(0, weights.shape[1], ctx.columns):
        stop = min(start + ctx.columns, weights.shape[1])
        if start >= kept_from:
            # Turned into exponentials in place below, so the saved cosines are copied.
            cosines = next(kept_cosines).clone()
        else:
            cosines, _ = _block_cosines(unit, weights, inverse_weight_norms, targets, start, stop)
        logits, soft = _modulated_logits(cosines, thresholds, ctx.hardness)
        _exponentials_times_slopes(
            cosines, logits, soft, ctx.hardness, shift, ctx.scale, inverse_weight_norms[start:stop]
        )
        exponentials = cosines
        if need_unit:
            unit_part.addmm_(exponentials, weights[:, start:stop].t())
        if need_weights:
            # Written straight into the column block (a valid BLAS output), no d × block copy.
            weight_part[:, start:stop].addmm_(scaled_unit_t, exponentials, beta=0)
    return unit_part, weight_part


class CurricularFaceLoss(BaseMarginHeadLoss):
    """CurricularFace (docs/theory.md §7.6): ArcFace whose hard negatives weigh more over time.

    With ``t_i = cos θ_{i,y_i}``, ``c_i = cos(θ_{i,y_i} + m)`` and the running ``T`` (buffer
    ``running_hardness``, starting at 0), each training step first sets, without gradient,
    ``T ← 0.01·mean_i t_i + 0.99·T``, then

        φ_ij = cos θ_ij·(T + cos θ_ij)  if cos θ_ij > c_i (a hard negative),  else cos θ_ij,
        ψ_i = c_i  if t_i > cos(π − m),  else t_i − m·sin(π − m),

    and ``L_i = −log(e^{s·ψ_i} / (e^{s·ψ_i} + Σ_{j≠y_i} e^{s·φ_ij}))``. Defaults are the
    reference repository's (HuangYG123/CurricularFace): ``m = 0.5``, ``s = 64``. ``T`` is frozen
    in ``eval()``; with ``process_group`` the mean is over the concatenated batch of all ranks.

    The non-target logits are modulated, so this head has its own kernel (like the fused one:
    with ``memory="buffer"`` one batch × classes buffer, three matrix products and block-sized
    temporaries; with ``"stream"`` blocks of columns, no batch × classes tensor, and a fourth
    product for all but the last blocks, whose cosines forward keeps: one with ``"stream"``, as
    many as fit the buffer limit with ``"auto"``) and its own sharded statistics under
    :class:`~pml_largest_margin.distributed.ClassParallelMarginHeadLoss`. Its sample margins
    (``collect_stats``) carry no gradient, so it takes no ``sample_margin_regularizer``.
    """

    supports_sample_margin_regularizer = False

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.5,
        scale: float = DEFAULT_SCALE,
        **kwargs,
    ):
        super().__init__(num_classes, embedding_size, scale, **kwargs)
        if not (math.isfinite(margin) and 0 <= margin < math.pi):
            raise ValueError(f"margin must lie in [0, π), got {margin}")
        self.margin = float(margin)
        self.register_buffer("running_hardness", torch.tensor(0.0, dtype=torch.float64))
        self.add_to_recordable_attributes(list_of_names=["margin"], is_stat=False)

    @torch.no_grad()
    def update_hardness(self, target_cosines: torch.Tensor) -> None:
        """``T ← 0.01·mean(t) + 0.99·T`` over the batch (of all ranks)."""
        values = target_cosines.double().clamp(-1.0, 1.0)
        sum_and_count = self.reduce_over_ranks(
            torch.stack([values.sum(), values.new_tensor(len(values))])
        )
        self.running_hardness.mul_(0.99).add_(0.01 * sum_and_count[0] / sum_and_count[1])

    def per_sample_losses(
        self,
        embeddings: torch.Tensor,
        weights: torch.Tensor,
        labels: torch.Tensor,
        with_margins: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        losses, margins = self.modulated_losses(embeddings, weights, labels.long(), self.memory)
        return losses, margins if with_margins else None

    def class_parallel_losses(
        self,
        embeddings: torch.Tensor,
        weights: torch.Tensor,
        local_targets: torch.Tensor,
        labels: torch.Tensor,
        group: dist.ProcessGroup | None,
        memory: str,
        track_max: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if track_max:
            raise ValueError("CurricularFaceLoss does not take a sample_margin_regularizer")
        # None names the default group here, but a single process in modulated_losses.
        group = dist.group.WORLD if group is None else group
        return self.modulated_losses(embeddings, weights, local_targets, memory, group)

    def modulated_losses(
        self,
        embeddings: torch.Tensor,
        weights: torch.Tensor,
        targets: torch.Tensor,
        memory: str,
        group: dist.ProcessGroup | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample losses and (gradient-free) sample margins of the batch.

        ``weights`` holds every class's column (``group=None``, ``targets`` the labels) or this
        rank's share of them (``targets`` −1 for a class held by another rank of ``group``).
        ``T`` is updated first (training mode) from the target cosines, then the kernel runs.
        """
        with torch.no_grad():
            unit = torch.nn.functional.normalize(embeddings, dim=1, eps=NORM_EPS)
            rows = (targets >= 0).nonzero().squeeze(1)
            prototypes = weights[:, targets[rows]]
            target_cosines = unit.new_zeros(unit.shape[0])
            target_cosines[rows] = (unit[rows] * prototypes.t()).sum(
                dim=1
            ) / torch.linalg.vector_norm(prototypes, dim=0).clamp_min(NORM_EPS)
            _all_reduce(target_cosines, dist.ReduceOp.SUM, group)
            if self.training:
                self.update_hardness(target_cosines)
            thresholds = torch.cos(arccos(target_cosines) + self.margin)
        columns, kept_blocks = None, 0
        if uses_stream(memory, embeddings.shape[0], weights.shape[1], weights.dtype):
            columns = stream_block_columns(embeddings.shape[0], embeddings.device, weights.dtype)
            kept_blocks = kept_stream_blocks(memory, embeddings.shape[0], columns, weights.dtype)
        nontarget_lse, target, nontarget_max = _ModulatedNonTargetLogSumExp.apply(
            embeddings, weights, targets, thresholds, float(self.running_hardness), self.scale,
            group, columns, kept_blocks,
        )  # fmt: skip
        target_logits = additive_angular_margin(target, self.margin)
        losses = generalized_margin_softmax_head(nontarget_lse, target_logits, self.scale)
        return losses, target.detach() - nontarget_max

    def head_losses(
        self,
        cosine_statistics: CosineStatistics,
        norms: torch.Tensor,
        labels: torch.Tensor,
        with_margins: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError(
            "CurricularFace modulates the non-target logits: it runs modulated_losses, not "
            "head_losses"
        )
