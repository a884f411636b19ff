"""The class-streaming path of the fused kernel against the formulas written out and the buffer path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning import miners

from pml_largest_margin.losses import GeneralizedMarginSoftmaxLoss, LargestMarginSoftmaxLoss, fused
from pml_largest_margin.losses.fused import fused_nontarget_logsumexp
from pml_largest_margin.margins import sample_margins_from_cosines
from pml_largest_margin.regularizers import SampleMarginRegularizer

SCALE = 8.0
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    ),
]
# (memory, block_columns): the buffer, and blocks of 1, non-dividing, and larger than C.
PATHS = [("buffer", None), ("stream", 1), ("stream", 3), ("stream", 5), ("stream", 1000)]


def problem(num_rows=9, num_classes=13, dim=5, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(num_rows, dim, generator=generator, dtype=torch.float64)
    W = torch.randn(dim, num_classes, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (num_rows,), generator=generator)
    upstream = torch.randn(3, num_rows, generator=generator, dtype=torch.float64)
    return embeddings.to(device), W.to(device), labels.to(device), upstream.to(device)


def reference_outputs(embeddings, W, labels, scale=SCALE):
    """u, t, γ by autograd through the plain formula (normalize clamps norms as the kernel does)."""
    cosines = torch.nn.functional.normalize(embeddings, dim=1) @ torch.nn.functional.normalize(
        W, dim=0
    )
    is_target = torch.nn.functional.one_hot(labels, W.shape[1]).bool()
    nontarget_lse = torch.logsumexp(scale * cosines.masked_fill(is_target, -torch.inf), dim=1)
    target = cosines.gather(1, labels[:, None]).squeeze(1)
    return nontarget_lse, target, sample_margins_from_cosines(cosines, labels)


def fused_outputs(embeddings, W, labels, memory, block_columns, scale=SCALE):
    return fused_nontarget_logsumexp(
        embeddings,
        W,
        labels,
        scale,
        with_margins=True,
        memory=memory,
        block_columns=block_columns,
    )


def values_and_gradients(outputs_of, embeddings, W, upstream, on_backward=lambda: None):
    """The three outputs and the gradients of Σ upstream·(u, t, γ) on embeddings and W
    (``on_backward`` is called between the two passes)."""
    z, w = embeddings.clone().requires_grad_(True), W.clone().requires_grad_(True)
    outputs = outputs_of(z, w)
    total = sum((output * weight).sum() for output, weight in zip(outputs, upstream, strict=True))
    on_backward()
    return [output.detach() for output in outputs] + list(torch.autograd.grad(total, (z, w)))


def assert_all_close(got, want, rtol=1e-12, atol=1e-12):
    for actual, expected in zip(got, want, strict=True):
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("memory", "block_columns"), PATHS)
def test_values_and_gradients_match_the_formula(device, memory, block_columns):
    embeddings, W, labels, upstream = problem(device=device)
    want = values_and_gradients(
        lambda z, w: reference_outputs(z, w, labels), embeddings, W, upstream
    )
    got = values_and_gradients(
        lambda z, w: fused_outputs(z, w, labels, memory, block_columns), embeddings, W, upstream
    )
    assert_all_close(got, want)


@pytest.mark.parametrize("block_columns", [1, 2, 3, 4])
def test_stream_equals_buffer_with_labels_on_block_boundaries(block_columns):
    embeddings, W, _, upstream = problem(num_rows=8, num_classes=12)
    # First and last columns of blocks, the first and the last class.
    labels = torch.tensor([0, 2, 3, 5, 6, 8, 9, 11])
    buffer = values_and_gradients(
        lambda z, w: fused_outputs(z, w, labels, "buffer", None), embeddings, W, upstream
    )
    stream = values_and_gradients(
        lambda z, w: fused_outputs(z, w, labels, "stream", block_columns), embeddings, W, upstream
    )
    assert_all_close(stream, buffer)


def test_a_shorter_block_comes_first_and_the_kept_last_block_is_whole():
    labels = torch.tensor([11, 0, 1, 2, 6, 7, -1, 7])
    blocks = [
        (start, stop, sorted(rows.tolist()))
        for start, stop, rows in fused._column_blocks(12, 5, labels)
    ]
    assert blocks == [(0, 2, [1, 2]), (2, 7, [3, 4]), (7, 12, [0, 5, 7])]
    assert list(fused._column_blocks(0, 5, labels[:0])) == []
    # The stream path on those blocks, labels on their first and last columns.
    embeddings, W, _, upstream = problem(num_rows=8, num_classes=12)
    labels[6] = 10
    buffer = values_and_gradients(
        lambda z, w: fused_outputs(z, w, labels, "buffer", None), embeddings, W, upstream
    )
    stream = values_and_gradients(
        lambda z, w: fused_outputs(z, w, labels, "stream", 5), embeddings, W, upstream
    )
    assert_all_close(stream, buffer)


@pytest.mark.parametrize("block_columns", [1, 2, 3, 6])
def test_tied_nearest_classes_split_the_gradient_within_and_across_blocks(block_columns):
    # Columns 2, 3 and 5 point the same way (3 and 5 scaled, exactly in binary): for samples of
    # other classes they tie as nearest class, inside one block or across a block boundary.
    W = torch.tensor(
        [[0.0, -1.0, 1.0, 2.0, 0.0, 0.5], [1.0, 0.0, 1.0, 2.0, -1.0, 0.5]], dtype=torch.float64
    )
    embeddings = torch.tensor([[1.0, 2.0], [3.0, 1.0], [1.0, 1.0], [0.5, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 4, 1, 2])
    upstream = torch.tensor([[0.3, -1.0, 0.2, 0.7], [1.0, 0.5, -0.4, 0.1], [1.0, -2.0, 0.5, 3.0]])
    upstream = upstream.double()
    want = values_and_gradients(
        lambda z, w: reference_outputs(z, w, labels), embeddings, W, upstream
    )
    got = values_and_gradients(
        lambda z, w: fused_outputs(z, w, labels, "stream", block_columns), embeddings, W, upstream
    )
    assert_all_close(got, want, atol=1e-14)
    W_grad = got[4]
    # The three tied prototypes all receive a share of the margins' −1 (not only the first).
    cosines = reference_outputs(embeddings, W, labels)
    assert cosines[2][:3].abs().min() > 0
    assert (W_grad[:, [2, 3, 5]].abs().sum(dim=0) > 0).all()


def test_gradcheck_of_the_stream_path():
    embeddings, W, labels, _ = problem(num_rows=6, num_classes=7, dim=4)
    assert torch.autograd.gradcheck(
        lambda z, w: fused_outputs(z, w, labels, "stream", 3),
        (embeddings.requires_grad_(True), W.requires_grad_(True)),
    )
    assert torch.autograd.gradcheck(
        lambda z, w: fused_nontarget_logsumexp(
            z, w, labels, SCALE, memory="stream", block_columns=2
        )[:2],
        (embeddings, W),
    )


def test_stream_keeps_its_graph_for_a_second_backward():
    embeddings, W, labels, upstream = problem()
    z, w = embeddings.requires_grad_(True), W.requires_grad_(True)
    u, t, margins = fused_outputs(z, w, labels, "stream", 4)
    total = (u * upstream[0]).sum() + (t * upstream[1]).sum() + (margins * upstream[2]).sum()
    first = torch.autograd.grad(total, (z, w), retain_graph=True)
    second = torch.autograd.grad(total, (z, w))
    assert_all_close(second, first, rtol=0, atol=0)


@pytest.mark.parametrize(("memory", "block_columns"), PATHS)
def test_zero_and_tiny_norms_are_clamped_like_normalize(memory, block_columns):
    # Row 0 is zero, row 1 has norm 1e-13 < NORM_EPS (clamped: plain scaling, no projection);
    # likewise columns 0 and 1 of W.
    embeddings, W, labels, upstream = problem(num_rows=6, num_classes=7)
    embeddings[0] = 0.0
    embeddings[1] *= 1e-13 / embeddings[1].norm()
    W[:, 0] = 0.0
    W[:, 1] *= 1e-13 / W[:, 1].norm()
    labels[2] = 1  # a clamped column as target, too
    want = values_and_gradients(
        lambda z, w: reference_outputs(z, w, labels), embeddings, W, upstream
    )
    got = values_and_gradients(
        lambda z, w: fused_outputs(z, w, labels, memory, block_columns), embeddings, W, upstream
    )
    for actual, expected in zip(got, want, strict=True):
        assert torch.isfinite(actual).all()
        torch.testing.assert_close(actual, expected, rtol=1e-11, atol=1e-12)


def test_row_blocks_of_the_maximum_search(monkeypatch):
    # Buffers of more than _SEARCH_BLOCK elements are searched in row blocks; make the blocks two
    # rows long so that every block after the first needs its row offset.
    embeddings, W, labels, upstream = problem(num_rows=9, num_classes=7)
    monkeypatch.setattr(fused, "_SEARCH_BLOCK", 2 * 7)
    want = values_and_gradients(
        lambda z, w: reference_outputs(z, w, labels), embeddings, W, upstream
    )
    got = values_and_gradients(
        lambda z, w: fused_outputs(z, w, labels, "buffer", None), embeddings, W, upstream
    )
    assert_all_close(got, want)


@pytest.mark.parametrize("num_columns", [4096 + 5, 2 * 4096])
def test_column_dots_covers_the_last_block(num_columns):
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(3, num_columns, generator=generator, dtype=torch.float64)
    b = torch.randn(3, num_columns, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(fused.column_dots(a, b), (a * b).sum(dim=0), rtol=1e-14, atol=0)


@pytest.mark.parametrize(("memory", "block_columns"), [("buffer", None), ("stream", 4)])
def test_weight_gradient_across_column_dot_blocks(monkeypatch, memory, block_columns):
    # The W gradient's projection takes column dot products in blocks: 13 classes in blocks of 5.
    monkeypatch.setattr(fused, "_COLUMN_BLOCK", 5)
    embeddings, W, labels, upstream = problem()
    want = values_and_gradients(
        lambda z, w: reference_outputs(z, w, labels), embeddings, W, upstream
    )
    got = values_and_gradients(
        lambda z, w: fused_outputs(z, w, labels, memory, block_columns), embeddings, W, upstream
    )
    assert_all_close(got, want)


def test_memory_modes_are_validated():
    embeddings, W, labels, _ = problem()
    with pytest.raises(ValueError, match="memory must be one of"):
        fused_nontarget_logsumexp(embeddings, W, labels, SCALE, memory="fast")
    with pytest.raises(ValueError, match="block_columns"):
        fused_nontarget_logsumexp(embeddings, W, labels, SCALE, memory="stream", block_columns=0)
    for build in (
        lambda: LargestMarginSoftmaxLoss(13, 5, memory="streaming"),
        lambda: GeneralizedMarginSoftmaxLoss.preset("arcface", 13, 5, memory=None),
    ):
        with pytest.raises(ValueError, match="memory must be one of"):
            build()
    with pytest.raises(ValueError, match="needs the default phi"):
        GeneralizedMarginSoftmaxLoss(13, 5, phi=lambda c: c, memory="stream")


def test_auto_streams_exactly_above_the_buffer_limit(monkeypatch):
    monkeypatch.setattr(fused, "BUFFER_LIMIT_BYTES", 9 * 13 * 8)
    assert not fused.uses_stream("auto", 9, 13, torch.float64)
    assert fused.uses_stream("auto", 9, 14, torch.float64)
    assert not fused.uses_stream("auto", 18, 13, torch.float32)  # the same bytes
    assert fused.uses_stream("auto", 19, 13, torch.float32)
    assert fused.uses_stream("stream", 1, 2) and not fused.uses_stream("buffer", 10**6, 10**6)
    # The loss's auto mode follows it: count the streaming passes.
    passes = []
    original = fused.stream_statistics
    monkeypatch.setattr(
        fused, "stream_statistics", lambda *args: passes.append(1) or original(*args)
    )
    embeddings, _, labels, _ = problem()
    loss_fn = LargestMarginSoftmaxLoss(13, 5).double()
    loss_fn(embeddings, labels)
    assert passes == []
    monkeypatch.setattr(fused, "BUFFER_LIMIT_BYTES", 9 * 13 * 8 - 1)
    loss_fn(embeddings, labels)
    assert passes == [1]


def test_auto_keeps_the_last_blocks_that_fit_the_buffer_limit(monkeypatch):
    monkeypatch.setattr(fused, "BUFFER_LIMIT_BYTES", 2 * 8 * 3 * 8)
    assert fused.kept_stream_blocks("stream", 8, 3, torch.float64) == 1
    assert fused.kept_stream_blocks("auto", 8, 3, torch.float64) == 2
    assert fused.kept_stream_blocks("auto", 8, 3, torch.float32) == 4
    assert fused.kept_stream_blocks("auto", 8, 100, torch.float64) == 1
    with pytest.raises(ValueError, match="memory must be one of"):
        fused.kept_stream_blocks("lazy", 8, 3)
    embeddings, W, _, upstream = problem(num_rows=8, num_classes=12)
    labels = torch.tensor([0, 1, 2, 6, 7, 11, 10, 3])
    buffer = values_and_gradients(
        lambda z, w: fused_outputs(z, w, labels, "buffer", None), embeddings, W, upstream
    )
    original_products = fused._addmm_in_column_slices
    recomputed = []

    def counting_products(out, left, right, width, beta):
        # In backward, the cosines' products are the ones that overwrite their output.
        recomputed.extend([1] if beta == 0 else [])
        return original_products(out, left, right, width, beta)

    def count_from_now():
        recomputed.clear()
        monkeypatch.setattr(fused, "_addmm_in_column_slices", counting_products)

    # (columns per block, blocks backward recomputes): 4 blocks of 3 with 2 kept; edges 0, 2, 7,
    # 12 with the last (whole) one kept; 12 blocks of 1 with 6 kept; one block, kept.
    for block_columns, recomputed_blocks in ((3, 2), (5, 2), (1, 6), (12, 0)):
        stream = values_and_gradients(
            lambda z, w, columns=block_columns: fused_outputs(z, w, labels, "auto", columns),
            embeddings,
            W,
            upstream,
            on_backward=count_from_now,
        )
        monkeypatch.setattr(fused, "_addmm_in_column_slices", original_products)
        assert_all_close(stream, buffer)
        assert len(recomputed) == recomputed_blocks, block_columns


@settings(max_examples=40, deadline=None)
@given(
    num_classes=st.integers(2, 17),
    block_columns=st.integers(1, 7),
    limit_blocks=st.integers(0, 4),
    slice_columns=st.integers(1, 7),
    seed=st.integers(0, 2**16),
)
def test_any_blocking_and_any_number_of_kept_blocks_equal_the_buffer(
    num_classes, block_columns, limit_blocks, slice_columns, seed
):
    """Blocks of any width, their products taken in slices of any width, with any number of
    blocks kept (``auto`` with a buffer limit of ``limit_blocks`` blocks; ``stream`` keeps one),
    give the buffer's values and gradients."""
    num_rows = 6
    embeddings, W, labels, upstream = problem(num_rows, num_classes, dim=4, seed=seed)
    buffer = values_and_gradients(
        lambda z, w: fused_outputs(z, w, labels, "buffer", None), embeddings, W, upstream
    )
    original = (fused.BUFFER_LIMIT_BYTES, fused._MIN_STREAM_BLOCK_COLUMNS)
    original_slice_bytes = fused._WEIGHT_SLICE_BYTES["cpu"]
    # Below the whole buffer's bytes, so that "auto" streams.
    fused.BUFFER_LIMIT_BYTES = min(
        limit_blocks * num_rows * block_columns * 8, num_rows * num_classes * 8 - 1
    )
    fused._MIN_STREAM_BLOCK_COLUMNS = 1
    fused._WEIGHT_SLICE_BYTES["cpu"] = slice_columns * W.shape[0] * 8
    try:
        for memory in ("stream", "auto"):
            got = values_and_gradients(
                lambda z, w, memory=memory: fused_outputs(z, w, labels, memory, block_columns),
                embeddings,
                W,
                upstream,
            )
            assert_all_close(got, buffer)
    finally:
        fused.BUFFER_LIMIT_BYTES, fused._MIN_STREAM_BLOCK_COLUMNS = original
        fused._WEIGHT_SLICE_BYTES["cpu"] = original_slice_bytes


def _pairs(rows, columns):
    return sorted(zip(rows.tolist(), columns.tolist(), strict=True))


def test_buffer_and_stream_statistics_equal_the_formula_with_targets_elsewhere():
    embeddings, W, labels, _ = problem(num_rows=7, num_classes=9)
    unit = torch.nn.functional.normalize(embeddings, dim=1)
    # Classes 3 and 4 point along row 1 (cos = 1, one block of 2 here): they tie as its nearest.
    W[:, 3], W[:, 4] = unit[1], 2 * unit[1]
    inverse_norms, _ = fused.inverse_column_norms(W)
    targets = labels.clone()
    targets[::3] = -1  # these rows' classes are held elsewhere
    targets[1] = 0
    cosines = unit @ torch.nn.functional.normalize(W, dim=0)
    has_target = targets >= 0
    is_target = torch.zeros_like(cosines, dtype=torch.bool)
    is_target[has_target, targets[has_target]] = True
    others = cosines.masked_fill(is_target, -torch.inf)
    want_max = others.amax(dim=1)
    want_sums = torch.exp(SCALE * (others - want_max[:, None])).sum(dim=1)
    want_target = torch.where(has_target, cosines[torch.arange(7), targets.clamp_min(0)], 0.0)
    want_positions = _pairs(*(others == want_max[:, None]).nonzero(as_tuple=True))
    assert len(want_positions) > len({row for row, _ in want_positions})  # a tie is there
    row_max, sums, target, positions, buffer = fused.buffer_statistics(
        unit, W, inverse_norms, targets, SCALE, True
    )
    assert_all_close([row_max, sums, target], [want_max, want_sums, want_target])
    assert _pairs(*positions) == want_positions
    want_X = torch.exp(SCALE * (others - want_max[:, None])) * inverse_norms
    assert_all_close([buffer], [want_X])
    row_max, sums, target, candidates, kept = fused.stream_statistics(
        unit, W, inverse_norms, targets, SCALE, 2, True, 2
    )
    assert_all_close([row_max, sums, target], [want_max, want_sums, want_target])
    maxima = candidates[2] == row_max[candidates[0]]
    assert _pairs(candidates[0][maxima], candidates[1][maxima]) == want_positions
    # The last 2 blocks (columns 5-8) are kept, as the raw products ẑ·w_j.
    assert_all_close([torch.cat(kept, dim=1)], [unit @ W[:, 5:]])


def test_block_size_follows_the_device_dtype_and_floor():
    assert fused.stream_block_columns(256, "cpu") == 8 * 2**20 // (256 * 4)
    assert fused.stream_block_columns(256, "cpu", torch.float64) == 8 * 2**20 // (256 * 8)
    assert fused.stream_block_columns(256, "cuda") == 256 * 2**20 // (256 * 4)
    assert fused.stream_block_columns(10**7, "cpu") == fused._MIN_STREAM_BLOCK_COLUMNS
    # Products with W in slices of 4 MiB of W on CPU (2,048 columns at d = 512), at least 256.
    assert fused._weight_slice_columns(torch.empty(512, 10)) == 2048
    assert fused._weight_slice_columns(torch.empty(128, 10, dtype=torch.float64)) == 4096
    assert fused._weight_slice_columns(torch.empty(10**5, 3)) == 256


LOSSES = {
    "lm": lambda **kw: LargestMarginSoftmaxLoss(13, 5, scale=SCALE, **kw),
    "gm-arcface": lambda **kw: GeneralizedMarginSoftmaxLoss.preset("arcface", 13, 5, **kw),
    "gm-sphereface": lambda **kw: GeneralizedMarginSoftmaxLoss.preset("sphereface", 13, 5, **kw),
    "gm-custom-psi": lambda **kw: GeneralizedMarginSoftmaxLoss(
        13, 5, scale=SCALE, psi=lambda c: c - 0.1 * c.square(), **kw
    ),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_stream_exactly_with_miner_regularizer_and_stats(monkeypatch, name, device):
    # Blocks of 2 columns for the batch of 20 in float64; 13 classes begin with a block of 1.
    monkeypatch.setitem(fused._STREAM_BLOCK_BYTES, device, 2 * 20 * 8)
    monkeypatch.setattr(fused, "_MIN_STREAM_BLOCK_COLUMNS", 1)
    generator = torch.Generator().manual_seed(5)
    embeddings = torch.randn(20, 5, generator=generator, dtype=torch.float64).to(device)
    labels = torch.randint(0, 13, (20,), generator=generator).to(device)
    indices_tuple = miners.MultiSimilarityMiner()(embeddings, labels)
    assert len(indices_tuple[0]) > 0
    results = {}
    for memory in ("buffer", "stream"):
        torch.manual_seed(0)
        loss_fn = LOSSES[name](
            memory=memory,
            sample_margin_regularizer=SampleMarginRegularizer(),
            sample_margin_reg_weight=0.3,
            collect_stats=True,
        ).to(device, torch.float64)
        z = embeddings.clone().requires_grad_(True)
        loss = loss_fn(z, labels, indices_tuple)
        loss.backward()
        stats = (loss_fn.mean_sample_margin, loss_fn.min_sample_margin)
        results[memory] = (loss.detach(), z.grad, loss_fn.W.grad, torch.tensor(stats))
    assert_all_close(results["stream"], results["buffer"])
