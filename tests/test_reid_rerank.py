import numpy as np
import pytest

from evaluation.reid import evaluate_reid, evaluate_reid_from_distances
from evaluation.reid.rerank import KReciprocalOptions, k_reciprocal_rerank


def dense_reference(query, gallery, k1=20, k2=6, lambda_value=0.3, power=1, metric="euclidean"):
    """The authors' algorithm over dense (N, N) matrices, float64, written out step by step."""
    joint = np.concatenate([query, gallery]).astype(np.float64)
    if metric == "cosine":
        unit = joint / np.linalg.norm(joint, axis=1, keepdims=True)
        base = 1 - unit @ unit.T
    else:
        base = ((joint[:, None, :] - joint[None, :, :]) ** 2).sum(-1)
    original = base**power
    # Each column divided by its maximum, then transposed.
    normalised = (original / original.max(axis=0)).T
    rank = np.argsort(normalised, axis=1, kind="stable")
    num_items, num_query = len(joint), len(query)

    def reciprocal(item, k):
        forward = rank[item, : k + 1]
        return np.array([j for j in forward if item in rank[j, : k + 1]], dtype=np.int64)

    weights = np.zeros((num_items, num_items))
    for item in range(num_items):
        base_set = reciprocal(item, k1)
        expanded = base_set
        for candidate in base_set:
            half = reciprocal(candidate, int(np.around(k1 / 2)))
            if len(np.intersect1d(half, base_set)) > 2 / 3 * len(half):
                expanded = np.append(expanded, half)
        expanded = np.unique(expanded)
        weight = np.exp(-normalised[item, expanded])
        weights[item, expanded] = weight / weight.sum()
    if k2 != 1:
        weights = np.stack([weights[rank[item, :k2]].mean(axis=0) for item in range(num_items)])
    shared = np.minimum(weights[:num_query, None, :], weights[None, :, :]).sum(-1)
    jaccard = 1 - shared / (2 - shared)
    final = (1 - lambda_value) * jaccard + lambda_value * normalised[:num_query]
    return final[:, num_query:]


def make_problem(seed, num_query=24, num_gallery=90, dim=10, num_ids=8):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_ids, dim)) * 1.5
    q_pids, g_pids = rng.integers(0, num_ids, num_query), rng.integers(0, num_ids, num_gallery)
    q_camids, g_camids = rng.integers(0, 3, num_query), rng.integers(0, 3, num_gallery)
    query = (centres[q_pids] + rng.normal(size=(num_query, dim))).astype(np.float32)
    gallery = (centres[g_pids] + rng.normal(size=(num_gallery, dim))).astype(np.float32)
    return query, gallery, (q_pids, g_pids, q_camids, g_camids)


@pytest.mark.parametrize(
    ("metric", "convention", "k1", "k2", "lambda_value"),
    [
        ("euclidean", "paper", 20, 6, 0.3),
        ("euclidean", "torchreid", 20, 6, 0.3),
        ("cosine", "paper", 20, 6, 0.3),
        ("cosine", "torchreid", 7, 3, 0.5),
        ("euclidean", "paper", 5, 1, 0.0),  # no local expansion; odd k1 (round(2.5) = 2)
        ("euclidean", "paper", 3, 8, 1.0),  # k2 > k1 + 1; λ = 1 is the original distance
    ],
)
def test_reranked_distances_equal_the_dense_reference(metric, convention, k1, k2, lambda_value):
    query, gallery, _ = make_problem(0)
    options = KReciprocalOptions(k1, k2, lambda_value, convention)
    power = 2 if convention == "torchreid" else 1
    expected = dense_reference(query, gallery, k1, k2, lambda_value, power, metric)
    # One block of all 114 items, then blocks of 7 rows (the last one partial: 114 = 16·7 + 2).
    for block_bytes in (2**28, 8 * 4 * 114 * 7):
        ours = k_reciprocal_rerank(
            query, gallery, metric, options, device="cpu", block_bytes=block_bytes
        ).dense()
        assert ours.shape == expected.shape == (24, 90)
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    # The reference really re-ranks: the Jaccard term moves distances away from D.
    if lambda_value < 1:
        assert (expected < 1 - lambda_value).any()


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_exact_ties_are_ordered_as_a_stable_argsort_does(metric):
    # Duplicated items tie exactly with their copies: neighbour order is decided by the exact
    # distance, then by index, as the reference's stable argsort does.
    query, gallery, _ = make_problem(5)
    gallery[30:45] = gallery[:15]
    query[:4] = gallery[20:24]
    options = KReciprocalOptions(k1=6, k2=3)
    ours = k_reciprocal_rerank(query, gallery, metric, options, device="cpu").dense()
    expected = dense_reference(query, gallery, 6, 3, metric=metric)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)


def test_blocks_of_one_row_give_the_same_distances():
    query, gallery, _ = make_problem(1)
    whole = k_reciprocal_rerank(query, gallery, device="cpu").dense()
    rows = k_reciprocal_rerank(query, gallery, device="cpu", block_bytes=1).dense()
    # Only the float32 products of the original distance depend on the block shape (torch's
    # matrix-vector and matrix-matrix products round differently); the sparse part does not.
    np.testing.assert_allclose(rows, whole, rtol=0, atol=1e-7)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_metrics_after_reranking_equal_those_of_the_reference_matrix(metric):
    query, gallery, ids = make_problem(2, num_query=30, num_gallery=120)
    expected = evaluate_reid_from_distances(dense_reference(query, gallery, metric=metric), *ids)
    for block_bytes in (1, 2**20):
        result = evaluate_reid(
            query, gallery, *ids, metric=metric, rerank=True, device="cpu", block_bytes=block_bytes
        )
        np.testing.assert_array_equal(result.cmc, expected.cmc)
        np.testing.assert_array_equal(result.average_precision, expected.average_precision)
        assert result.mAP == expected.mAP and result.mINP == expected.mINP
    plain = evaluate_reid(query, gallery, *ids, metric=metric, device="cpu")
    assert plain.mAP != expected.mAP


def test_rerank_option_forms():
    query, gallery, ids = make_problem(3)
    options = KReciprocalOptions(k1=6, k2=2, lambda_value=0.2)
    by_options = evaluate_reid(query, gallery, *ids, rerank=options, device="cpu")
    by_dict = evaluate_reid(
        query, gallery, *ids, rerank={"k1": 6, "k2": 2, "lambda_value": 0.2}, device="cpu"
    )
    np.testing.assert_array_equal(by_options.average_precision, by_dict.average_precision)
    assert by_options.mAP == by_dict.mAP
    off = evaluate_reid(query, gallery, *ids, rerank=False, device="cpu")
    assert off.mAP == evaluate_reid(query, gallery, *ids, device="cpu").mAP
    with pytest.raises(TypeError, match="rerank"):
        evaluate_reid(query, gallery, *ids, rerank="yes", device="cpu")


def test_bad_rerank_input():
    query, gallery, _ = make_problem(4, num_query=3, num_gallery=5)
    for bad in (
        {"k1": 0},
        {"k2": 0},
        {"k1": True},
        {"lambda_value": 1.5},
        {"lambda_value": -0.1},
        {"convention": "squared"},
    ):
        with pytest.raises(ValueError):
            KReciprocalOptions(**bad)
    with pytest.raises(ValueError, match="neighbours but there are only 8"):
        k_reciprocal_rerank(query, gallery, options=KReciprocalOptions(k1=8))
    with pytest.raises(ValueError, match="metric"):
        k_reciprocal_rerank(query, gallery, "ip")
    with pytest.raises(ValueError, match="dimension"):
        k_reciprocal_rerank(query, gallery[:, :3], options=KReciprocalOptions(k1=2))
    with pytest.raises(ValueError, match="distance 0"):
        same = np.ones((4, 2), dtype=np.float32)
        k_reciprocal_rerank(same, same, options=KReciprocalOptions(k1=2, k2=1)).dense()


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("scale", [2.0**70, 2.0**-70])
def test_reranking_features_of_extreme_magnitude(metric, scale):
    # Scaled by 2^70 the float32 products overflow, by 2^-70 they underflow. Re-ranking does not
    # change under a common scale, and a power-of-two rescaling is exact, so the re-ranked
    # distances must be those of the plain features to the last bit.
    query, gallery, _ = make_problem(6)
    plain = k_reciprocal_rerank(query, gallery, metric, device="cpu").dense()
    factor = np.float32(scale)
    scaled = k_reciprocal_rerank(query * factor, gallery * factor, metric, device="cpu").dense()
    np.testing.assert_array_equal(scaled, plain)


def test_rerank_errors_name_what_was_given_and_block_bytes_must_be_positive():
    query, gallery, ids = make_problem(7, num_query=4, num_gallery=30)
    with pytest.raises(TypeError, match="a KReciprocalOptions or a dict, got str$"):
        evaluate_reid(query, gallery, *ids, rerank="yes", device="cpu")
    with pytest.raises(ValueError, match="block_bytes"):
        k_reciprocal_rerank(query, gallery, device="cpu", block_bytes=0)
