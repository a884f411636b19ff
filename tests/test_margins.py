import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from loss_utils import seeded_randn

from pml_largest_margin.margins import (
    class_margin,
    class_margin_upper_bound,
    cosine_logits,
    sample_margin_upper_bound,
    sample_margins,
    sample_margins_from_cosines,
)
from pml_largest_margin.prototypes import simplex_prototypes


def naive_class_margin(W):
    unit = torch.nn.functional.normalize(W.double(), dim=0)
    cosines = unit.t() @ unit
    cosines.fill_diagonal_(-math.inf)
    return math.acos(float(cosines.max().clamp(-1, 1)))


@pytest.mark.parametrize(
    "num_classes,dim,block", [(2, 3, None), (17, 5, 1), (50, 8, 7), (300, 16, None)]
)
def test_class_margin_matches_naive(num_classes, dim, block):
    W = torch.randn(dim, num_classes, dtype=torch.float64) * torch.rand(
        num_classes, dtype=torch.float64
    )
    result = class_margin(W, block_size=block)
    assert result.radians == pytest.approx(naive_class_margin(W), abs=1e-12)
    j, k = result.closest_pair
    assert j < k
    pair_angle = math.acos(
        float(torch.nn.functional.cosine_similarity(W[:, j], W[:, k], dim=0).clamp(-1, 1))
    )
    assert pair_angle == pytest.approx(result.radians, abs=1e-12)
    assert result.degrees == pytest.approx(math.degrees(result.radians))


def test_class_margin_of_orthonormal_prototypes_is_right_angle():
    assert class_margin(torch.eye(6)).radians == pytest.approx(math.pi / 2)


def test_bounds_closed_forms():
    assert class_margin_upper_bound(10, 32) == pytest.approx(math.acos(-1 / 9))
    assert class_margin_upper_bound(2, 1) == pytest.approx(math.pi)
    assert class_margin_upper_bound(100, 16) == pytest.approx(math.pi / 2)
    assert sample_margin_upper_bound(10) == pytest.approx(10 / 9)
    with pytest.raises(ValueError, match="num_classes >= 2"):
        class_margin_upper_bound(1, 3)
    with pytest.raises(ValueError, match="embedding_size >= 1"):
        class_margin_upper_bound(3, 0)
    with pytest.raises(ValueError, match="num_classes >= 2"):
        sample_margin_upper_bound(1)


@pytest.mark.parametrize("dim", [2, 3, 5])
def test_rankin_bound_is_attained_by_the_cross_polytope(dim):
    # Past d + 1 classes the bound drops from arccos(-1/(C-1)) to π/2, and ±e_k reach it up to 2d.
    cross_polytope = torch.cat([torch.eye(dim), -torch.eye(dim)], dim=1)
    for num_classes in range(dim + 2, 2 * dim + 1):
        bound = class_margin_upper_bound(num_classes, dim)
        assert bound == pytest.approx(math.pi / 2)
        assert bound < math.acos(-1 / (num_classes - 1))
        assert class_margin(cross_polytope[:, :num_classes]).radians == pytest.approx(bound)


def test_sample_margins_hand_made():
    W = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]])  # prototypes at 0°, 90°, 180°
    embeddings = torch.tensor([[3.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    expected = torch.tensor([1.0 - 0.0, math.sqrt(0.5) - math.sqrt(0.5), 0.0 - 1.0])
    torch.testing.assert_close(sample_margins(embeddings, labels, W), expected)
    torch.testing.assert_close(sample_margins(embeddings, labels, W, block_size=1), expected)


@pytest.mark.parametrize(
    "embeddings,labels,W,error",
    [
        (seeded_randn(4, 3), torch.tensor([0, 1, 2, 5]), seeded_randn(3, 4), ValueError),
        (seeded_randn(4, 3), torch.tensor([0, 1, 2]), seeded_randn(3, 4), ValueError),
        (seeded_randn(4, 3), torch.tensor([0.0, 1, 2, 3]), seeded_randn(3, 4), TypeError),
        (seeded_randn(4, 3), torch.tensor([0, 1, 2, 3]), seeded_randn(4, 3), ValueError),
        (torch.full((4, 3), math.nan), torch.tensor([0, 1, 2, 3]), seeded_randn(3, 4), ValueError),
    ],
)
def test_sample_margins_bad_input(embeddings, labels, W, error):
    with pytest.raises(error):
        sample_margins(embeddings, labels, W)


def test_class_margin_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        class_margin(torch.randn(3, 1))
    with pytest.raises(ValueError, match="NaN"):
        class_margin(torch.tensor([[math.inf, 1.0], [0.0, 1.0]]))


def naive_sample_margins(embeddings, labels, W):
    cosines = torch.nn.functional.normalize(embeddings, dim=1) @ torch.nn.functional.normalize(
        W, dim=0
    )
    margins = []
    for i, label in enumerate(labels.tolist()):
        others = [cosines[i, j] for j in range(W.shape[1]) if j != label]
        margins.append(cosines[i, label] - max(others))
    return torch.stack(margins)


@pytest.mark.parametrize("block", [None, 1, 3])
def test_sample_margins_match_naive(block):
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn(11, 6, generator=generator, dtype=torch.float64)
    W = torch.randn(6, 9, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 9, (11,), generator=generator)
    torch.testing.assert_close(
        sample_margins(embeddings, labels, W, block_size=block),
        naive_sample_margins(embeddings, labels, W),
    )


def test_mixed_dtypes_are_promoted():
    generator = torch.Generator().manual_seed(6)
    embeddings = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    W = torch.randn(3, 4, generator=generator)
    labels = torch.tensor([0, 1, 2, 3, 0])
    mixed = sample_margins(embeddings, labels, W)
    assert mixed.dtype == torch.float64
    torch.testing.assert_close(mixed, sample_margins(embeddings, labels, W.double()))


def test_sample_margins_from_cosines_agrees_with_sample_margins():
    embeddings, W = torch.randn(7, 4, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    torch.testing.assert_close(
        sample_margins_from_cosines(cosine_logits(embeddings, W), labels),
        sample_margins(embeddings, labels, W),
    )


def test_sample_margins_sub_centers_take_the_best_sub_center():
    generator = torch.Generator().manual_seed(2)
    embeddings = torch.randn(8, 5, generator=generator, dtype=torch.float64)
    W = torch.randn(5, 4 * 3, generator=generator, dtype=torch.float64)  # 4 classes × 3
    labels = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    cosines = cosine_logits(embeddings, W).view(8, 4, 3).amax(dim=2)
    expected = torch.stack(
        [
            cosines[i, y] - cosines[i, [j for j in range(4) if j != y]].max()
            for i, y in enumerate(labels)
        ]
    )
    torch.testing.assert_close(sample_margins(embeddings, labels, W, sub_centers=3), expected)
    with pytest.raises(ValueError, match="multiple of sub_centers"):
        sample_margins(embeddings, labels, W, sub_centers=5)
    with pytest.raises(ValueError, match="labels"):
        sample_margins(embeddings, labels + 1, W, sub_centers=3)


def test_sample_margins_gradcheck():
    generator = torch.Generator().manual_seed(3)
    embeddings = torch.randn(5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    W = torch.randn(4, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 5, 2, 2, 1])
    assert torch.autograd.gradcheck(lambda e, w: sample_margins(e, labels, w), (embeddings, W))


def test_simplex_reaches_the_class_margin_bound():
    for num_classes, dim in [(2, 1), (3, 2), (10, 9), (10, 64), (65, 64)]:
        W = simplex_prototypes(num_classes, dim)
        bound = class_margin_upper_bound(num_classes, dim)
        assert class_margin(W).radians == pytest.approx(bound, abs=1e-6)
        assert class_margin(
            simplex_prototypes(num_classes, dim, torch.float64), block_size=4
        ).radians == pytest.approx(bound, abs=1e-12)


def test_simplex_with_one_sample_on_each_prototype_reaches_the_sample_margin_bound():
    W = simplex_prototypes(7, 10, dtype=torch.float64)
    margins = sample_margins(W.t() * 3.0, torch.arange(7), W)
    torch.testing.assert_close(
        margins, torch.full((7,), sample_margin_upper_bound(7), dtype=torch.float64)
    )


def test_class_margin_is_accurate_for_nearly_parallel_prototypes():
    angle = 1e-5
    W = torch.tensor(
        [[1.0, math.cos(angle), -1.0], [0.0, math.sin(angle), 0.2]], dtype=torch.float64
    )
    result = class_margin(W)
    assert result.closest_pair == (0, 1)
    assert result.radians == pytest.approx(angle, rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_class_margin_of_half_precision_prototypes(dtype):
    W = torch.randn(16, 40, generator=torch.Generator().manual_seed(4))
    half = W.to(dtype)
    assert class_margin(half).radians == pytest.approx(naive_class_margin(half.double()), abs=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    num_classes=st.integers(2, 40),
    dim=st.integers(1, 6),
    block=st.integers(1, 50),
    seed=st.integers(0, 2**16),
)
def test_class_margin_invariants(num_classes, dim, block, seed):
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(dim, num_classes, generator=generator, dtype=torch.float64)
    reference = class_margin(W).radians
    assert reference == pytest.approx(naive_class_margin(W), abs=1e-9)
    assert 0.0 <= reference <= class_margin_upper_bound(num_classes, dim) + 1e-12
    scales = torch.rand(num_classes, generator=generator, dtype=torch.float64) + 0.1
    permutation = torch.randperm(num_classes, generator=generator)
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    transformed = rotation @ (W * scales)[:, permutation]
    assert class_margin(transformed, block_size=block).radians == pytest.approx(reference, abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 12),
    num_classes=st.integers(2, 9),
    dim=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_sample_margin_invariants(batch, num_classes, dim, seed):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    W = torch.randn(dim, num_classes, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (batch,), generator=generator)
    margins = sample_margins(embeddings, labels, W)
    assert bool(((margins >= -2 - 1e-12) & (margins <= 2 + 1e-12)).all())
    rescaled = sample_margins(
        embeddings * (torch.rand(batch, 1, generator=generator, dtype=torch.float64) + 0.1),
        labels,
        W * (torch.rand(num_classes, generator=generator, dtype=torch.float64) + 0.1),
    )
    torch.testing.assert_close(rescaled, margins)
    # Every sample's own class is at least as close as the second best only if its margin >= 0.
    cosines = cosine_logits(embeddings, W)
    assert torch.equal(
        margins >= 0, cosines.gather(1, labels[:, None]).squeeze(1) >= cosines.max(1).values
    )


def test_bad_sizes_and_types_are_rejected():
    with pytest.raises(ValueError, match="at least 2"):
        sample_margins(torch.randn(2, 3), torch.tensor([0, 0]), torch.randn(3, 1))
    with pytest.raises(ValueError, match="block_size"):
        class_margin(torch.randn(3, 4), block_size=0)
    for block_size in (0, -1):  # -1 used to return an empty tensor, 0 a bare range() error
        with pytest.raises(ValueError, match="block_size"):
            sample_margins(torch.randn(2, 3), torch.tensor([0, 1]), torch.randn(3, 2), block_size)
    with pytest.raises(TypeError):
        class_margin(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="PML's layout"):
        class_margin(torch.randn(3))


# --- zero vectors: one rule, the clamped norm (cosine 0 with everything) ----------------------


def test_zero_prototype_and_zero_embedding_have_cosine_zero():
    W = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]])  # column 1 is zero
    embeddings = torch.tensor([[3.0, 0.0], [0.0, 0.0], [-1.0, 1.0]])
    cosines = cosine_logits(embeddings, W)
    expected = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-(0.5**0.5), 0.0, 0.5**0.5]])
    torch.testing.assert_close(cosines, expected)
    labels = torch.tensor([1, 0, 2])
    # γ = cos_target − max_other: (0 − 1), (0 − 0), (√½ − 0)
    torch.testing.assert_close(
        sample_margins(embeddings, labels, W), torch.tensor([-1.0, 0.0, 0.5**0.5])
    )
    torch.testing.assert_close(
        sample_margins_from_cosines(cosines, labels), sample_margins(embeddings, labels, W)
    )


def test_sample_margins_with_zero_vectors_match_the_fused_kernel_and_have_finite_gradients():
    from pml_largest_margin.losses.fused import fused_nontarget_logsumexp

    generator = torch.Generator().manual_seed(7)
    embeddings = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    W = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    embeddings[2], W[:, 3] = 0.0, 0.0
    labels = torch.tensor([0, 3, 1, 2, 4, 3])
    z, w = embeddings.clone().requires_grad_(True), W.clone().requires_grad_(True)
    margins = sample_margins(z, labels, w)
    _, _, fused = fused_nontarget_logsumexp(embeddings, W, labels, 8.0, with_margins=True)
    torch.testing.assert_close(margins, fused, rtol=0, atol=1e-15)
    margins.sum().backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("position", [0, 2, 3])
def test_class_margin_puts_a_zero_prototype_at_a_right_angle(position):
    # The other prototypes are 60° apart; a zero column is at 90° from each, so it never wins.
    W = torch.tensor([[1.0, 0.5, -0.5], [0.0, 0.75**0.5, 0.75**0.5]], dtype=torch.float64)
    W = torch.cat([W[:, :position], torch.zeros(2, 1, dtype=torch.float64), W[:, position:]], 1)
    result = class_margin(W)
    assert result.radians == pytest.approx(math.pi / 3, abs=1e-12)
    only_zero_columns_left = torch.cat([W[:, :1] * 0, torch.tensor([[1.0], [0.0]])], dim=1)
    assert class_margin(only_zero_columns_left.double()).radians == pytest.approx(math.pi / 2)
    assert class_margin(torch.zeros(3, 4)).radians == pytest.approx(math.pi / 2)


# --- edges ----------------------------------------------------------------------------------


def test_class_margin_of_float16_prototypes_whose_squared_norms_overflow_float16():
    # ‖(60000, 60000)‖ is inf in float16: compared in float16, that column would look like cosine 0
    # with everything and the 45° pair (0, 2) would be lost to the 90° pair (0, 1).
    W = torch.tensor([[1.0, 0.0, 60000.0], [0.0, -3.0, 60000.0]], dtype=torch.float16)
    assert torch.isinf(torch.linalg.vector_norm(W[:, 2]))
    result = class_margin(W)
    assert result.closest_pair == (0, 2)
    assert result.radians == pytest.approx(math.pi / 4, abs=1e-12)


def test_sub_centers_must_be_a_positive_integer():
    embeddings, labels, W = torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), torch.randn(3, 4)
    with pytest.raises(ValueError, match="sub_centers"):
        sample_margins(embeddings, labels, W, sub_centers=0)
    with pytest.raises(TypeError, match="sub_centers"):
        sample_margins(embeddings, labels, W, sub_centers=True)
    with pytest.raises(TypeError, match="sub_centers"):
        sample_margins(embeddings, labels, W, sub_centers=2.0)


@pytest.mark.parametrize("block_size", [None, 1])
def test_sample_margins_of_an_empty_batch(block_size):
    W = torch.randn(3, 4, dtype=torch.float64)
    embeddings = torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)
    margins = sample_margins(embeddings, torch.zeros(0, dtype=torch.long), W, block_size)
    assert margins.shape == (0,) and margins.dtype == torch.float64
    margins.sum().backward()  # on the graph, like a non-empty batch
    assert embeddings.grad.shape == (0, 3)
    mixed = sample_margins(embeddings, torch.zeros(0, dtype=torch.long), W.float(), block_size)
    assert mixed.dtype == torch.float64  # promoted, as for a non-empty batch
    sub_centered = sample_margins(
        embeddings.detach(), torch.zeros(0, dtype=torch.long), torch.randn(3, 6), sub_centers=3
    )
    assert sub_centered.shape == (0,)


def test_sample_margin_upper_bound_of_two_classes_is_two():
    # Two antipodal prototypes, each sample on its own: γ = 1 − (−1) = 2 = C/(C − 1).
    assert sample_margin_upper_bound(2) == 2.0
    W = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    margins = sample_margins(W.t() * 5, torch.tensor([0, 1]), W)
    assert margins.tolist() == [2.0, 2.0]


# --- edges found by mutation testing (docs/testing.md) -----------------------------------------


def test_a_prototype_of_norm_exactly_norm_eps_keeps_its_direction():
    # ‖w_0‖ = NORM_EPS exactly: not below the zero rule's threshold, so w_0 is parallel to w_1.
    W = torch.tensor([[1e-12, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    margin = class_margin(W)
    assert margin.closest_pair == (0, 1)
    assert margin.radians == 0.0


@pytest.mark.parametrize("block_size", [None, 1, 2, 3])
def test_tied_closest_pairs_report_the_first_visited(block_size):
    # Pairs (0, 1) and (2, 3) are both parallel; with block_size=2 they lie in different tiles.
    W = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    assert class_margin(W, block_size=block_size).closest_pair == (0, 1)


def test_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"^block_size must be an integer >= 1, got 0"):
        class_margin(seeded_randn(3, 4), block_size=0)
    with pytest.raises(ValueError, match=r"^sub_centers must be an integer >= 1, got 0"):
        sample_margins(seeded_randn(2, 3), torch.tensor([0, 1]), seeded_randn(3, 2), sub_centers=0)
    # Labels valid for the classes, so only the size check can refuse W's 5 rows.
    with pytest.raises(ValueError, match="5 rows but the embeddings have dimension 3"):
        sample_margins(seeded_randn(4, 3), torch.tensor([0, 1, 2, 3]), seeded_randn(5, 4))
    # The class count is an integer in messages, also with sub-centres (C·k / k).
    with pytest.raises(ValueError, match=r"in \[0, 3\] for 4 classes"):
        sample_margins(seeded_randn(2, 3), torch.tensor([0, 4]), seeded_randn(3, 8), sub_centers=2)


def test_float32_embeddings_with_float64_prototypes_are_promoted():
    generator = torch.Generator().manual_seed(7)
    embeddings = torch.randn(5, 3, generator=generator)
    W = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 0])
    mixed = sample_margins(embeddings, labels, W)
    assert mixed.dtype == torch.float64
    torch.testing.assert_close(mixed, sample_margins(embeddings.double(), labels, W))


def test_two_sub_centers_per_class():
    generator = torch.Generator().manual_seed(8)
    embeddings = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    W = torch.randn(4, 3 * 2, generator=generator, dtype=torch.float64)  # 3 classes × 2
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    cosines = cosine_logits(embeddings, W).view(6, 3, 2).amax(dim=2)
    expected = torch.stack(
        [
            cosines[i, y] - cosines[i, [j for j in range(3) if j != y]].max()
            for i, y in enumerate(labels)
        ]
    )
    torch.testing.assert_close(sample_margins(embeddings, labels, W, sub_centers=2), expected)
