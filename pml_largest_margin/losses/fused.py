"""Fused ``(u, t, γ)`` of the margin-softmax losses from embeddings and prototypes, gradient written out.

With ``ẑ_i = z_i/‖z_i‖`` and ``cos_ij = (ẑ_i · w_j)/‖w_j‖`` the function returns

    u_i = log Σ_{j≠y_i} exp(s·cos_ij)        and        t_i = cos_{i,y_i}

(see :mod:`pml_largest_margin.losses.functional` for the heads that turn them into losses).
Autograd through the plain formula keeps several batch × classes tensors alive and a normalised
copy of W. Two exact schemes replace it, chosen by ``memory=``:

``"buffer"``: one (N, C) buffer does all the work.
forward   ``X = ẑ @ W``, scaled column-wise by ``1/‖w_j‖`` in place (the cosines), the target
          entries set to −inf, then ``exp(s·(X − max))`` in place; its row sums give ``u``. The
          buffer is finally scaled by ``1/‖w_j‖`` once more and kept for the backward pass.
backward  with ``a = ∂/∂u`` and ``b = ∂/∂t``, the gradient on the cosines is ``a_i·s·p_ij`` off
          the target (``p`` the softmax over non-target classes) and ``b_i`` on it. Row factors are
          moved onto the (N, d) operands, so the saved buffer is only read: ``∂/∂ẑ = r∘(X W^T) +
          b∘ŵ_y`` and ``∂/∂ŵ_j/‖w_j‖ = ((r∘ẑ)^T X)_j`` plus the target columns, with ``r = a·s/Σ``.
          The normalisations contribute projections: ``∂/∂z = (g − ẑ(ẑ·g))/‖z‖`` and likewise per
          column of W, taken in blocks of columns; the target (and nearest) terms are sparse and
          added already projected (the projection is linear).
          Three matrix products in all; peak memory is W, its gradient, one (N, C) buffer and
          (N, d) or (C,) vectors.

``"stream"``: W is visited in blocks of columns and nothing of size N × C is ever formed.
forward   per block, the block's cosines, its target entries, and an online log-sum-exp: the
          running row maximum ``m`` and the running sum ``Σ exp(s·(cos − m))``, rescaled by
          ``exp(s·(m_old − m_new))`` whenever the maximum grows. Only (N,) vectors survive a block.
backward  the upstream ``a`` is known only now, so each block's cosines are recomputed once (the
          same product on the same operands) and turned into ``exp(s·(cos − m))/‖w_j‖``, which
          then plays the buffer's part for its columns (:func:`stream_gradients`): ``X_b W_b^T``
          is accumulated into ``∂/∂ẑ``, and ``(r∘ẑ)^T X_b``, projected, is written into the
          block's columns of ``∂/∂W`` while the block is at hand (the projection's dot products
          come from the block's own products, so the d × block gradient is written once). The
          last block's products are kept from forward, so it is not recomputed (a shorter block,
          if any, comes first). Four matrix products less one block's (the recomputation is the
          fourth); peak memory is W, its gradient, two N × block temporaries allocated once per
          pass and the kept block (:func:`stream_block_columns`).

``"auto"`` (the default) streams when the buffer would exceed :data:`BUFFER_LIMIT_BYTES`, and
then keeps the products of as many last blocks as fit that limit (:func:`kept_stream_blocks`), so
only the others are recomputed: past the limit the cost grows with the part of W that does not
fit, instead of jumping to a fourth product.

Optionally the sample margins ``γ_i = t_i − max_{j≠y_i} cos_ij`` come out too, differentiable and
nearly free: the row maximum of the non-target cosines is taken anyway for a stable log-sum-exp.
Their gradient on the cosines is +1 at the target and −1 at the nearest non-target class, split
evenly among non-target classes tied for the maximum (torch.amax's rule, so it equals autograd
through :func:`pml_largest_margin.margins.sample_margins_from_cosines`). The forward pass records
the (row, class) pairs of those maxima, typically N of them (the streaming pass keeps every block's
maxima that reach the running maximum and drops those overtaken at the end), and backward adds two
rank-N updates; no further matrix product and no further N × C buffer. Nothing saved is ever
overwritten, so ``retain_graph`` and ``gradcheck`` work. Everything runs in the dtype of the inputs
with autocast disabled, on any device (the block size is chosen for the device).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# Norms below NORM_EPS are clamped, as torch.nn.functional.normalize does; it is defined with the
# checks so that margins.py (imported by this package) applies the same rule.
from ..validation import NORM_EPS

# Columns per block when taking column-wise dot products of two (d, C) matrices.
_COLUMN_BLOCK = 4096
# Elements per block when searching the (N, C) buffer for row maxima (a bool temporary of 4 MB).
_SEARCH_BLOCK = 2**22
MEMORY_MODES = ("buffer", "stream", "auto")
DEFAULT_MEMORY = "auto"
# memory="auto" streams when the (N, C) buffer of the cosines would take more bytes than this.
BUFFER_LIMIT_BYTES = 256 * 2**20
# Bytes of the N × block temporary of the streaming pass: 8 MiB on CPU (per-block overhead stays
# small while the block is still in the last-level cache; at C = 100k, d = 512, blocks of 2k-8k
# columns took the same time on one thread), 256 MiB on CUDA (large enough to fill the device).
_STREAM_BLOCK_BYTES = {"cpu": 8 * 2**20, "cuda": 256 * 2**20}
# Fewest columns per block, so that a very large batch still gets products of a useful width.
_MIN_STREAM_BLOCK_COLUMNS = 256
# On CPU a block's products with W (and into W's gradient) are taken in slices of columns whose
# part of the (d, C) matrix is at most this many bytes: a column slice of a row-major matrix is d
# strided rows, and wide ones slow the products down (C = 100k, d = 512 on a 2-core AMD EPYC:
# slices of 2,048 columns instead of whole 8,192-column blocks took 2-5 % off a stream step).
_WEIGHT_SLICE_BYTES = {"cpu": 4 * 2**20}


def check_memory_mode(memory: str) -> str:
    """``memory`` if it names a path of the kernel (``"buffer"``, ``"stream"``, ``"auto"``).

    Raises:
        ValueError: anything else.
    """
    if not isinstance(memory, str) or memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
    return memory


def uses_stream(
    memory: str, num_rows: int, num_columns: int, dtype: torch.dtype = torch.float32
) -> bool:
    """Whether ``memory`` streams for an N × C problem: ``"auto"`` does so when the buffer of the
    cosines would exceed :data:`BUFFER_LIMIT_BYTES`."""
    if check_memory_mode(memory) != "auto":
        return memory == "stream"
    element_size = dtype.itemsize
    return num_rows * num_columns * element_size > BUFFER_LIMIT_BYTES


def stream_block_columns(
    num_rows: int, device: torch.device | str, dtype: torch.dtype = torch.float32
) -> int:
    """Columns per block of the streaming pass for a batch of ``num_rows`` in ``dtype`` on
    ``device``: as many as fit the device's byte budget for the N × block temporary
    (:data:`_STREAM_BLOCK_BYTES`), at least :data:`_MIN_STREAM_BLOCK_COLUMNS`."""
    device_type = torch.device(device).type
    budget = _STREAM_BLOCK_BYTES.get(device_type, _STREAM_BLOCK_BYTES["cpu"])
    element_size = dtype.itemsize
    return max(_MIN_STREAM_BLOCK_COLUMNS, budget // (max(1, num_rows) * element_size))


def kept_stream_blocks(
    memory: str, num_rows: int, block_columns: int, dtype: torch.dtype = torch.float32
) -> int:
    """How many of the last blocks' products the streaming pass keeps from forward for backward,
    which then does not recompute them: 1 for ``"stream"``; for ``"auto"``, as many as fit
    :data:`BUFFER_LIMIT_BYTES` (the memory the buffer may take), at least 1."""
    if check_memory_mode(memory) != "auto":
        return 1
    element_size = dtype.itemsize
    return max(1, BUFFER_LIMIT_BYTES // (max(1, num_rows) * block_columns * element_size))


def _zero_positions(shifted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and columns of the zeros of ``shifted`` = cosines − row maxima: the maxima.

    ``x − m == 0`` exactly when ``x == m`` for finite floats, so the zeros are the maxima, ties
    included. Searched in row blocks to keep the boolean temporary small.
    """
    rows_per_block = max(1, _SEARCH_BLOCK // max(1, shifted.shape[1]))
    rows, columns = [], []
    for start in range(0, shifted.shape[0], rows_per_block):
        block_rows, block_columns = (shifted[start : start + rows_per_block] == 0).nonzero(
            as_tuple=True
        )
        rows.append(block_rows + start)
        columns.append(block_columns)
    return torch.cat(rows), torch.cat(columns)


def _tie_shares(rows: torch.Tensor, num_rows: int, dtype: torch.dtype) -> torch.Tensor:
    """1/(number of entries of the same row) for each entry of ``rows``."""
    ties = torch.bincount(rows, minlength=num_rows)
    return ties.to(dtype).reciprocal()[rows]


def column_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(0)`` for (d, C) matrices without a (d, C) temporary: in blocks of columns
    through one reused (d, block) product, which stays in cache (on CPU about twice as fast as
    a reduction over the strided first dimension of the whole matrix)."""
    out = torch.empty(a.shape[1], dtype=a.dtype, device=a.device)
    scratch = a.new_empty(a.shape[0] * min(_COLUMN_BLOCK, a.shape[1]))
    for start in range(0, a.shape[1], _COLUMN_BLOCK):
        stop = min(start + _COLUMN_BLOCK, a.shape[1])
        products = _block_views(scratch, a.shape[0], stop - start)
        torch.mul(a[:, start:stop], b[:, start:stop], out=products)
        torch.sum(products, dim=0, out=out[start:stop])
    return out


def _normalisation_backward(
    grad_unit: torch.Tensor, unit: torch.Tensor, inverse_norms: torch.Tensor, clamped: torch.Tensor
) -> torch.Tensor:
    """Gradient through ``x/max(‖x‖, eps)`` for rows: a projection, plain scaling where clamped."""
    radial = (unit * grad_unit).sum(dim=1, keepdim=True)
    projected = grad_unit - unit * radial.masked_fill(clamped[:, None], 0.0)
    return projected * inverse_norms[:, None]


def _column_blocks(num_columns: int, block_columns: int, targets: torch.Tensor):
    """``(start, stop, rows)`` per block of columns; ``rows`` are the samples whose target lies in
    the block (targets < 0, a class held elsewhere, belong to no block). A shorter block, if
    any, comes first, so the last block (the one kept from forward for backward) is a whole one."""
    order = torch.argsort(targets)
    first_stop = num_columns % block_columns or block_columns
    edges = [0, *range(first_stop, num_columns, block_columns), num_columns] if num_columns else []
    bounds = torch.tensor(edges, dtype=targets.dtype, device=targets.device)
    positions = torch.searchsorted(targets[order], bounds).tolist()
    for index in range(len(edges) - 1):
        rows = order[positions[index] : positions[index + 1]]
        yield edges[index], edges[index + 1], rows


def buffer_statistics(
    unit: torch.Tensor,
    weights: torch.Tensor,
    inverse_weight_norms: torch.Tensor,
    targets: torch.Tensor,
    scale: float,
    track_nearest: bool,
    reduce_max: Callable[[torch.Tensor], object] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
    """:func:`stream_statistics` from one (N, K) buffer: the row maxima ``m`` of the non-target
    cosines, the sums ``Σ_{j≠y} exp(s·(cos_ij − m_i))``, the target cosines (0 for target −1),
    with ``track_nearest`` the ``(rows, columns)`` of the maxima among these columns, ties
    included, and the buffer, left holding ``X = exp(s·(cos − m))/‖w_j‖`` (0 at the targets) for
    :func:`buffer_gradients`. ``reduce_max`` changes the maxima in place before they are used
    (across ranks: their all-reduce, so the maxima and the positions are the global ones)."""
    buffer = unit @ weights
    buffer.mul_(inverse_weight_norms)
    rows = (targets >= 0).nonzero().squeeze(1)
    columns = targets[rows]
    target = buffer.new_zeros(buffer.shape[0])
    target[rows] = buffer[rows, columns]
    buffer[rows, columns] = -math.inf
    row_max = buffer.amax(dim=1)
    if reduce_max is not None:
        reduce_max(row_max)
    buffer.sub_(row_max[:, None])
    positions = _zero_positions(buffer) if track_nearest else ()
    row_sums = buffer.mul_(scale).exp_().sum(dim=1)
    buffer.mul_(inverse_weight_norms)
    return row_max, row_sums, target, positions, buffer


def stream_statistics(
    unit: torch.Tensor,
    weights: torch.Tensor,
    inverse_weight_norms: torch.Tensor,
    targets: torch.Tensor,
    scale: float,
    block_columns: int,
    track_nearest: bool,
    kept_blocks: int = 1,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]
]:
    """One streaming pass over the columns of ``weights`` (d, K) for unit rows ``unit`` (N, d).

    ``targets`` (N,) int64: each row's target column, or −1 for none among these columns.
    Returns the row maxima ``m`` of the non-target cosines (−inf where there are none), the sums
    ``Σ_{j≠y} exp(s·(cos_ij − m_i))`` (0 where there are none), the target cosines (0 for −1) and,
    with ``track_nearest``, the candidates ``(rows, columns, values)`` for the maxima: every entry
    equal to its block's maximum when that reached the running maximum. The true maxima are the
    candidates whose value equals the final (or, across ranks, the global) maximum; last, the
    products ``ẑ·w_j`` of the last ``kept_blocks`` blocks, kept for :func:`stream_gradients`
    (which then does not recompute them). One N × block temporary is reused by the other blocks.
    """
    num_rows = unit.shape[0]
    row_max = unit.new_full((num_rows,), -math.inf)
    row_sums = unit.new_zeros(num_rows)
    target = unit.new_zeros(num_rows)
    storage = unit.new_empty(num_rows * min(block_columns, weights.shape[1]))
    candidates = []
    kept = []
    # A shorter block comes first, so the last kept_blocks blocks are whole.
    kept_from = weights.shape[1] - kept_blocks * block_columns
    width = _weight_slice_columns(weights)
    for start, stop, rows in _column_blocks(weights.shape[1], block_columns, targets):
        cosines = _block_views(storage, num_rows, stop - start)
        block = weights[:, start:stop]
        if start >= kept_from:
            kept.append(
                _addmm_in_column_slices(unit.new_empty(cosines.shape), unit, block, width, 0)
            )
            torch.mul(kept[-1], inverse_weight_norms[start:stop], out=cosines)
        else:
            _addmm_in_column_slices(cosines, unit, block, width, 0)
            cosines.mul_(inverse_weight_norms[start:stop])
        columns = targets[rows] - start
        target[rows] = cosines[rows, columns]
        cosines[rows, columns] = -math.inf
        block_max = cosines.amax(dim=1)
        if track_nearest:
            # Only rows whose maximum this block reaches are searched: after the first blocks
            # they are few (a fraction of about 1/b at block b for exchangeable columns).
            reached = (block_max >= row_max).nonzero().squeeze(1)
            hit_rows, hit_columns = (cosines[reached] == block_max[reached, None]).nonzero(
                as_tuple=True
            )
            hit_rows = reached[hit_rows]
            candidates.append((hit_rows, hit_columns + start, block_max[hit_rows]))
        new_max = torch.maximum(row_max, block_max)
        # A row whose block held only its target has maximum −inf so far: shift by 0 instead.
        shift = new_max.nan_to_num(neginf=0.0)
        # s·cos − s·shift in one pass, then exp.
        torch.add(shift[:, None] * -scale, cosines, alpha=scale, out=cosines).exp_()
        row_sums.mul_(row_max.sub(shift).mul_(scale).exp_()).add_(cosines.sum(dim=1))
        row_max = new_max
    if track_nearest:
        nearest = tuple(torch.cat(parts) for parts in zip(*candidates, strict=True))
    else:
        nearest = ()
    return row_max, row_sums, target, nearest, tuple(kept)


def _weight_slice_columns(weights: torch.Tensor) -> int:
    """Columns per slice of the products with ``weights`` (d, C) (:data:`_WEIGHT_SLICE_BYTES`)."""
    budget = _WEIGHT_SLICE_BYTES.get(weights.device.type)
    if budget is None:
        return max(1, weights.shape[1])
    return max(_MIN_STREAM_BLOCK_COLUMNS, budget // (weights.shape[0] * weights.element_size()))


def _addmm_in_column_slices(
    out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, width: int, beta: float
) -> torch.Tensor:
    """``out = beta·out + left @ right`` in slices of ``width`` columns (``beta = 0`` ignores
    what ``out`` held, NaN included)."""
    for start in range(0, right.shape[1], width):
        stop = start + width
        out[:, start:stop].addmm_(left, right[:, start:stop], beta=beta)
    return out


def _block_views(flat: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """A contiguous (rows, columns) view of the front of the reused block storage ``flat``."""
    return flat[: rows * columns].view(rows, columns)


def stream_gradients(
    unit: torch.Tensor,
    weights: torch.Tensor,
    inverse_weight_norms: torch.Tensor,
    weight_clamped: torch.Tensor,
    targets: torch.Tensor,
    scale: float,
    row_max: torch.Tensor,
    row_factor: torch.Tensor,
    grad_target: torch.Tensor,
    nearest: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    block_columns: int,
    kept: tuple[torch.Tensor, ...],
    need_unit: bool,
    need_weights: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(∂/∂ẑ, ∂/∂W)`` of the streamed statistics, W visited once more in blocks of columns.

    With ``X_ij = exp(s·(cos_ij − m_i))/‖w_j‖`` off the targets and 0 on them (``m`` =
    ``row_max``), the gradient on ``cos_ij`` is ``r_i·‖w_j‖·X_ij`` (``r`` = ``row_factor``) plus
    ``grad_target`` at each row's target (rows with target −1 get none) plus the ``grads`` of
    ``nearest`` at its ``(rows, columns)``. Each block's cosines are recomputed once (the same
    product on the same operands; the last blocks' are ``kept`` from :func:`stream_statistics`,
    only read) and turned into ``X`` in three elementwise passes; from
    it ``X_b W_b^T`` is accumulated into ``∂/∂ẑ`` and ``(r∘ẑ)^T X_b``, projected through
    ``w/‖w‖``, is written into the block's columns of ``∂/∂W`` while the block is at hand. The
    sparse target and nearest terms are added afterwards, projected the same way (the projection
    is linear). The two N × block temporaries are allocated once and reused.
    """
    num_rows = unit.shape[0]
    width = min(block_columns, weights.shape[1])
    products_storage = unit.new_empty(num_rows * width)
    exponentials_storage = unit.new_empty(num_rows * width)
    shifts = row_max * -scale
    grad_unit = unit.new_zeros(unit.shape) if need_unit else None
    grad_weights = None
    if need_weights:
        grad_weights = torch.empty_like(weights)
        scaled_unit_t = (unit * row_factor[:, None]).t()
    kept_from = weights.shape[1] - sum(products.shape[1] for products in kept)
    kept_products = iter(kept)
    width = _weight_slice_columns(weights)
    for start, stop, rows in _column_blocks(weights.shape[1], block_columns, targets):
        block = weights[:, start:stop]
        # Per-column factors are taken per block: no further vector of C entries is allocated.
        inverse_norms = inverse_weight_norms[start:stop]
        scratch = _block_views(products_storage, num_rows, stop - start)
        exponentials = _block_views(exponentials_storage, num_rows, stop - start)
        if start >= kept_from:
            products = next(kept_products)
        else:
            products = _addmm_in_column_slices(scratch, unit, block, width, 0)
        # s·(cos − m) = (ẑ·w_j)·(s/‖w_j‖) − s·m in one pass, then exp, then the column scale.
        torch.addcmul(shifts[:, None], products, inverse_norms * scale, out=exponentials)
        exponentials.exp_()
        exponentials[rows, targets[rows] - start] = 0.0
        exponentials.mul_(inverse_norms)
        if need_unit:
            grad_unit.addmm_(exponentials, block.t())
        if need_weights:
            # The projection's w_j·g_j with g_j = Σ_i r_i·X_ij·ẑ_i is Σ_i r_i·X_ij·(ẑ_i·w_j): taken
            # from the N × block products at hand instead of a pass over the d × block gradient,
            # so the column block of ∂/∂W is written once, as -w_j·(w_j·g_j)/‖w_j‖², and the
            # product is accumulated onto it (a column block of a row-major matrix is a valid
            # BLAS output).
            dots = torch.mv(torch.mul(products, exponentials, out=scratch).t(), row_factor)
            dots.mul_(_radial_scale(inverse_norms, weight_clamped[start:stop])).neg_()
            block_grad = grad_weights[:, start:stop]
            torch.mul(block, dots, out=block_grad)
            _addmm_in_column_slices(block_grad, scaled_unit_t, exponentials, width, 1)
    if need_unit:
        grad_unit.mul_(row_factor[:, None])
    return _add_sparse_gradients(
        unit, weights, inverse_weight_norms, weight_clamped, targets, grad_target, nearest,
        grad_unit, grad_weights,
    )  # fmt: skip


def _radial_scale(inverse_norms: torch.Tensor, clamped: torch.Tensor) -> torch.Tensor:
    """``1/‖w_j‖²`` per column, 0 where the norm is clamped (the normalisation is then a plain
    scaling, with no projection)."""
    return inverse_norms.square().masked_fill_(clamped, 0.0)


def buffer_gradients(
    unit: torch.Tensor,
    weights: torch.Tensor,
    inverse_weight_norms: torch.Tensor,
    weight_clamped: torch.Tensor,
    targets: torch.Tensor,
    buffer: torch.Tensor,
    row_factor: torch.Tensor,
    grad_target: torch.Tensor,
    nearest: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    need_unit: bool,
    need_weights: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """:func:`stream_gradients` from a whole (N, C) buffer holding ``X`` (read, not changed):
    two matrix products, then :func:`cosine_gradients`."""
    unit_part = buffer @ weights.t() if need_unit else None
    weight_part = (unit * row_factor[:, None]).t() @ buffer if need_weights else None
    return cosine_gradients(
        unit, weights, inverse_weight_norms, weight_clamped, targets, row_factor, grad_target,
        nearest, unit_part, weight_part,
    )  # fmt: skip


def cosine_gradients(
    unit: torch.Tensor,
    weights: torch.Tensor,
    inverse_weight_norms: torch.Tensor,
    weight_clamped: torch.Tensor,
    targets: torch.Tensor,
    row_factor: torch.Tensor,
    grad_target: torch.Tensor,
    nearest: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    unit_part: torch.Tensor | None,
    weight_part: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(∂/∂ẑ, ∂/∂W)`` from a kernel's two dense products, ``unit_part = X W^T`` and
    ``weight_part = (r∘ẑ)^T X`` (the terms of :func:`stream_gradients`, from a buffer or from
    another head's own ``X``): ``unit_part`` scaled by ``r``, ``weight_part`` projected through
    ``w/‖w‖`` in blocks of columns, then the target and nearest terms added. Both parts are
    consumed (updated in place)."""
    grad_unit = grad_weights = None
    if unit_part is not None:
        grad_unit = unit_part.mul_(row_factor[:, None])
    if weight_part is not None:
        grad_weights = weight_part
        scratch = unit.new_empty(unit.shape[1] * min(_COLUMN_BLOCK, weights.shape[1]))
        for start in range(0, weights.shape[1], _COLUMN_BLOCK):
            columns = slice(start, start + _COLUMN_BLOCK)
            block_grad = grad_weights[:, columns]
            _project_columns_(
                block_grad,
                weights[:, columns],
                _radial_scale(inverse_weight_norms[columns], weight_clamped[columns]),
                _block_views(scratch, *block_grad.shape),
            )
    return _add_sparse_gradients(
        unit, weights, inverse_weight_norms, weight_clamped, targets, grad_target, nearest,
        grad_unit, grad_weights,
    )  # fmt: skip


def _project_columns_(
    grad: torch.Tensor, weights: torch.Tensor, radial_scale: torch.Tensor, scratch: torch.Tensor
) -> torch.Tensor:
    """``grad_j ← grad_j − w_j·(w_j·grad_j)·radial_scale_j`` per column, in place: the gradient
    through ``w/‖w‖`` when ``grad_j`` holds ``∂L/∂ŵ_j / ‖w_j‖`` and ``radial_scale_j = 1/‖w_j‖²``
    (0 where the norm is clamped, where the normalisation is a plain scaling). ``scratch`` is a
    (d, K) block of the same shape, overwritten."""
    torch.mul(weights, grad, out=scratch)
    dots = scratch.sum(dim=0).mul_(radial_scale)
    return grad.addcmul_(weights, dots, value=-1.0)


def _add_sparse_gradients(
    unit: torch.Tensor,
    weights: torch.Tensor,
    inverse_weight_norms: torch.Tensor,
    weight_clamped: torch.Tensor,
    targets: torch.Tensor,
    grad_target: torch.Tensor,
    nearest: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    grad_unit: torch.Tensor | None,
    grad_weights: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Add the gradients of the target and nearest cosines to ``(∂/∂ẑ, ∂/∂W)`` (in place).

    Entry k at ``(row i, column j)`` with gradient ``c_k`` on ``cos_ij`` adds ``c_k·ŵ_j`` to
    ``∂/∂ẑ_i`` and ``c_k·(ẑ_i − ŵ_j(ŵ_j·ẑ_i))/‖w_j‖`` to ``∂/∂w_j`` (already projected through
    ``w/‖w‖``, so it may come after the dense part's projection).
    """
    rows = (targets >= 0).nonzero().squeeze(1)
    columns, grads = targets[rows], grad_target[rows]
    if nearest is not None:
        rows, columns = torch.cat([rows, nearest[0]]), torch.cat([columns, nearest[1]])
        grads = torch.cat([grads, nearest[2]])
    prototypes = weights[:, columns].t()
    coefficients = grads * inverse_weight_norms[columns]
    if grad_unit is not None:
        grad_unit.index_add_(0, rows, prototypes * coefficients[:, None])
    if grad_weights is not None:
        embeddings = unit[rows]
        radial = (embeddings * prototypes).sum(dim=1)
        radial.mul_(_radial_scale(inverse_weight_norms[columns], weight_clamped[columns]))
        part = embeddings.sub_(prototypes * radial[:, None]).mul_(coefficients[:, None])
        grad_weights.index_add_(1, columns, part.t())
    return grad_unit, grad_weights


def clamped_normalisation(
    embeddings: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit rows of ``embeddings``, their inverse norms and clamp mask, and the inverse column
    norms of ``weights`` with their clamp mask; norms below ``NORM_EPS`` are clamped to it."""
    embedding_norms = torch.linalg.vector_norm(embeddings, dim=1)
    inverse_embedding_norms = embedding_norms.clamp_min(NORM_EPS).reciprocal()
    return (
        embeddings * inverse_embedding_norms[:, None],
        inverse_embedding_norms,
        embedding_norms < NORM_EPS,
        *inverse_column_norms(weights),
    )


def inverse_column_norms(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``1/max(‖w_j‖, NORM_EPS)`` per column of ``weights`` (d, C) and the mask of clamped
    columns, with one vector of C entries besides the mask (computed in place)."""
    norms = column_dots(weights, weights).sqrt_()
    clamped = norms < NORM_EPS
    return norms.clamp_min_(NORM_EPS).reciprocal_(), clamped


class _NonTargetLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, embeddings, weights, labels, scale, with_margins, block_columns, kept_blocks):
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            (
                unit,
                inverse_embedding_norms,
                embedding_clamped,
                inverse_weight_norms,
                weight_clamped,
            ) = clamped_normalisation(embeddings, weights)
            targets = labels.long()
            track_nearest = with_margins and any(ctx.needs_input_grad[:2])
            nearest = (targets.new_empty(0),) * 2 + (unit.new_empty(0),)
            buffer, kept = None, ()
            if block_columns is None:
                row_max, row_sums, target, positions, buffer = buffer_statistics(
                    unit, weights, inverse_weight_norms, targets, scale, track_nearest
                )
                if track_nearest:
                    rows, columns = positions
            else:
                row_max, row_sums, target, candidates, kept = stream_statistics(
                    unit, weights, inverse_weight_norms, targets, scale, block_columns,
                    track_nearest, kept_blocks,
                )  # fmt: skip
                if track_nearest:
                    rows, columns, values = candidates
                    maxima = values == row_max[rows]
                    rows, columns = rows[maxima], columns[maxima]
            if track_nearest:
                nearest = (rows, columns, _tie_shares(rows, unit.shape[0], unit.dtype))
            nontarget_lse = scale * row_max + row_sums.log()
            # One (N,) subtraction, so γ is always made; without with_margins it carries no
            # gradient (non-differentiable, and backward gets None for it).
            margins = target - row_max

        ctx.scale, ctx.block_columns = scale, block_columns
        # Unused outputs reach backward as None rather than zeros, so margins kept only as
        # statistics add nothing to it.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(
            unit,
            inverse_embedding_norms,
            embedding_clamped,
            weights,
            inverse_weight_norms,
            weight_clamped,
            targets,
            buffer,
            row_sums,
            row_max,
            *nearest,
            *kept,
        )
        if not with_margins:
            ctx.mark_non_differentiable(margins)
        return nontarget_lse, target, margins

    @staticmethod
    def backward(ctx, grad_lse, grad_target, grad_margins):
        (
            unit,
            inverse_embedding_norms,
            embedding_clamped,
            weights,
            inverse_weight_norms,
            weight_clamped,
            targets,
            buffer,
            row_sums,
            row_max,
            nearest_rows,
            nearest_columns,
            nearest_shares,
            *kept,
        ) = ctx.saved_tensors
        need_embeddings, need_weights = ctx.needs_input_grad[:2]
        if grad_lse is None:
            grad_lse = torch.zeros_like(row_sums)
        if grad_target is None:
            grad_target = torch.zeros_like(row_sums)
        nearest = None
        if grad_margins is not None and grad_margins.numel():
            # γ = t − max: +∂/∂γ joins the target's gradient, −∂/∂γ goes to the maxima.
            grad_target = grad_target + grad_margins
            nearest = (nearest_rows, nearest_columns, -grad_margins[nearest_rows] * nearest_shares)
        row_factor = grad_lse * ctx.scale / row_sums
        grad_embeddings = None

        with torch.autocast(device_type=unit.device.type, enabled=False):
            if buffer is not None:
                grad_unit, grad_weights = buffer_gradients(
                    unit, weights, inverse_weight_norms, weight_clamped, targets, buffer,
                    row_factor, grad_target, nearest, need_embeddings, need_weights,
                )  # fmt: skip
            else:
                grad_unit, grad_weights = stream_gradients(
                    unit, weights, inverse_weight_norms, weight_clamped, targets, ctx.scale,
                    row_max, row_factor, grad_target, nearest, ctx.block_columns, tuple(kept),
                    need_embeddings, need_weights,
                )  # fmt: skip
            if need_embeddings:
                grad_embeddings = _normalisation_backward(
                    grad_unit, unit, inverse_embedding_norms, embedding_clamped
                )
        return grad_embeddings, grad_weights, None, None, None, None, None


def fused_nontarget_logsumexp(
    embeddings: torch.Tensor,
    weights: torch.Tensor,
    labels: torch.Tensor,
    scale: float,
    *,
    with_margins: bool = False,
    memory: str = DEFAULT_MEMORY,
    block_columns: int | None = None,
    detached_margins: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(u, t, γ)`` for embeddings (N, d), prototypes ``weights`` (d, C) and labels (N,).

    ``u_i = log Σ_{j≠y_i} exp(s·cos_ij)``, ``t_i = cos_{i,y_i}``; both differentiable with respect
    to ``embeddings`` and ``weights`` (same dtype and device, at least 2 classes; no checks here,
    the losses validate). ``γ`` holds the sample margins ``t_i − max_{j≠y_i} cos_ij`` when
    ``with_margins`` is true, else ``None``: the values of
    :func:`pml_largest_margin.margins.sample_margins_from_cosines` on the same cosines, and
    differentiable too, with its gradient (ties among the nearest non-target classes share the
    −1 evenly, as with ``torch.amax``). ``detached_margins=True`` (with ``with_margins`` false)
    returns the same values without a gradient, for margins kept only as statistics: taken from
    the forward pass's row maxima, with no nearest-class bookkeeping and nothing added to backward.

    ``memory``: ``"buffer"`` keeps one (N, C) buffer, ``"stream"`` visits W in blocks of
    ``block_columns`` columns (default :func:`stream_block_columns`) with no N × C tensor,
    ``"auto"`` streams when the buffer would exceed :data:`BUFFER_LIMIT_BYTES` (see the module
    docstring). Both give the same values and gradients up to rounding.

    Raises:
        ValueError: an unknown ``memory``, a ``block_columns`` below 1, or both
            ``with_margins`` and ``detached_margins``.
    """
    if with_margins and detached_margins:
        raise ValueError("with_margins and detached_margins exclude each other; choose one")
    stream = uses_stream(memory, embeddings.shape[0], weights.shape[1], weights.dtype)
    if block_columns is not None and (int(block_columns) != block_columns or block_columns < 1):
        raise ValueError(f"block_columns must be an integer >= 1, got {block_columns}")
    kept_blocks = 0
    if stream:
        if block_columns is None:
            block_columns = stream_block_columns(
                embeddings.shape[0], embeddings.device, weights.dtype
            )
        block_columns = int(block_columns)
        kept_blocks = kept_stream_blocks(memory, embeddings.shape[0], block_columns, weights.dtype)
    nontarget_lse, target, margins = _NonTargetLogSumExp.apply(
        embeddings,
        weights,
        labels,
        float(scale),
        bool(with_margins),
        block_columns if stream else None,
        kept_blocks,
    )
    return nontarget_lse, target, margins if with_margins or detached_margins else None
