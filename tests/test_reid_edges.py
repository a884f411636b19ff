"""Re-ID and top-k inputs at the edges: extreme magnitudes, mixed and narrow dtypes, bad sizes."""

import numpy as np
import pytest
import torch

from evaluation.knn import l2_normalize, top_k
from evaluation.reid import evaluate_reid, pairwise_distances, reranking_candidates


def _problem(seed=0, num_query=12, num_gallery=60, dim=8):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, dim))
    q_pids, g_pids = rng.integers(0, 6, num_query), rng.integers(0, 6, num_gallery)
    q_camids, g_camids = rng.integers(0, 3, num_query), rng.integers(0, 3, num_gallery)
    query = (centres[q_pids] + rng.normal(size=(num_query, dim))).astype(np.float32)
    gallery = (centres[g_pids] + rng.normal(size=(num_gallery, dim))).astype(np.float32)
    return query, gallery, (q_pids, g_pids, q_camids, g_camids)


def _same_metrics(first, second):
    np.testing.assert_array_equal(first.cmc, second.cmc)
    np.testing.assert_array_equal(first.average_precision, second.average_precision)
    assert (first.mAP, first.mINP) == (second.mAP, second.mINP)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("scale", [2.0**63, 2.0**-76])
def test_features_scaled_by_a_power_of_two_rank_exactly_alike(metric, scale):
    # 2^63 ≈ 9e18 (float32 squared norms overflow), 2^-76 ≈ 1e-23 (they underflow to zero).
    query, gallery, ids = _problem()
    plain = evaluate_reid(query, gallery, *ids, metric=metric, device="cpu")
    scaled = evaluate_reid(
        query * np.float32(scale), gallery * np.float32(scale), *ids, metric=metric, device="cpu"
    )
    _same_metrics(plain, scaled)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("scale", [1e19, 1e-23])
def test_features_of_extreme_magnitude_match_float64(metric, scale):
    # Decimal factors are not exact in float32: compare with float64 on the same float32 values.
    query, gallery, ids = _problem(1)
    query, gallery = query * np.float32(scale), gallery * np.float32(scale)
    assert np.isfinite(query).all() and (np.abs(query) > 0).all()
    in_float32 = evaluate_reid(query, gallery, *ids, metric=metric, device="cpu")
    in_float64 = evaluate_reid(
        query.astype(np.float64), gallery.astype(np.float64), *ids, metric=metric, device="cpu"
    )
    _same_metrics(in_float32, in_float64)
    assert 0 < in_float32.mAP < 1


def test_pairwise_distances_refuse_what_float32_cannot_hold():
    query, gallery, _ = _problem()
    with pytest.raises(ValueError, match="overflow or underflow float32: pass float64"):
        pairwise_distances(query * np.float32(1e19), gallery, "euclidean")
    with pytest.raises(ValueError, match="overflow or underflow"):
        pairwise_distances(query * np.float32(1e-23), gallery * np.float32(1e-23), "euclidean")
    wide = pairwise_distances(query.astype(np.float64) * 1e19, gallery * 1.0, "euclidean")
    assert np.isfinite(wide).all()
    # Cosine distances do not depend on the scale.
    np.testing.assert_allclose(
        pairwise_distances(query * np.float32(1e19), gallery, "cosine"),
        pairwise_distances(query, gallery, "cosine"),
        atol=1e-6,
    )


def test_l2_normalize_tiny_huge_and_zero_rows():
    rows = np.array([[3.0, 4.0], [3e-23, 4e-23], [3e19, 4e19], [3e-45, 0.0]], np.float32)
    np.testing.assert_allclose(l2_normalize(rows)[:3], [[0.6, 0.8]] * 3, rtol=1e-6)
    np.testing.assert_array_equal(l2_normalize(rows)[3], [1.0, 0.0])  # a subnormal row
    # Ordinary rows are bit for bit what x / ‖x‖ gives.
    ordinary = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    np.testing.assert_array_equal(
        l2_normalize(ordinary), ordinary / np.linalg.norm(ordinary, axis=1, keepdims=True)
    )
    with pytest.raises(ValueError, match="zero feature vector"):
        l2_normalize(np.array([[1e-23, 0.0], [0.0, 0.0]], np.float32))


def test_top_k_extreme_magnitudes():
    query, gallery, _ = _problem(2)
    expected = top_k(query, gallery, 5, metric="cosine")[1]
    for scale in (1e19, 1e-23):
        scaled = top_k(query * np.float32(scale), gallery * np.float32(scale), 5, "cosine")[1]
        np.testing.assert_array_equal(scaled, expected)
    # float64 rows beyond the float32 range are normalised before FAISS's float32 cast.
    np.testing.assert_array_equal(
        top_k(query.astype(np.float64) * 1e200, gallery.astype(np.float64) * 1e-200, 5, "cosine")[
            1
        ],
        expected,
    )
    for metric in ("ip", "l2"):
        with pytest.raises(ValueError, match="overflow or underflow float32"):
            top_k(query * np.float32(1e19), gallery, 5, metric=metric)
        with pytest.raises(ValueError, match="overflow or underflow float32"):
            top_k(query * 1e-30, gallery * 1e-30, 5, metric=metric)


def test_mixed_dtypes_compute_in_the_wider_one():
    query, gallery, ids = _problem(3)
    wide_gallery = gallery.astype(np.float64)
    mixed = evaluate_reid(query, wide_gallery, *ids, device="cpu")
    both_wide = evaluate_reid(query.astype(np.float64), wide_gallery, *ids, device="cpu")
    _same_metrics(mixed, both_wide)
    assert pairwise_distances(query, wide_gallery).dtype == np.float64
    np.testing.assert_array_equal(
        top_k(query, wide_gallery, 4, "l2")[1], top_k(query * 1.0, wide_gallery, 4, "l2")[1]
    )


def test_bfloat16_tensors_are_widened_to_float32():
    query, gallery, ids = _problem(4)
    query_bf16, gallery_bf16 = (
        torch.from_numpy(query).bfloat16(),
        torch.from_numpy(gallery).bfloat16(),
    )
    from_bf16 = evaluate_reid(query_bf16, gallery_bf16, *ids, device="cpu")
    from_float32 = evaluate_reid(
        query_bf16.float().numpy(), gallery_bf16.float().numpy(), *ids, device="cpu"
    )
    _same_metrics(from_bf16, from_float32)
    assert top_k(query_bf16, gallery_bf16, 3)[1].shape == (12, 3)


@pytest.mark.parametrize("block_bytes", [0, -1, 1e6, 2.5, True, "1000"])
def test_block_bytes_must_be_a_positive_integer(block_bytes):
    query, gallery, ids = _problem()
    with pytest.raises(ValueError, match="block_bytes must be a positive integer"):
        evaluate_reid(query, gallery, *ids, device="cpu", block_bytes=block_bytes)


def test_rank_is_checked():
    query, gallery, ids = _problem()
    result = evaluate_reid(query, gallery, *ids, device="cpu", max_rank=10)
    assert result.rank(1) == result.cmc[0] and result.rank(10) == result.cmc[9]
    assert result.rank(np.int64(3)) == result.cmc[2]
    for k in (0, -1, 11, 2.0, True):
        with pytest.raises(ValueError, match=r"rank k must be an integer in \[1, 10\]"):
            result.rank(k)


def test_feature_errors_name_the_argument():
    query, gallery, _ = _problem()
    with pytest.raises(ValueError, match="^query_features "):
        pairwise_distances(query[:, :, None], gallery)
    with pytest.raises(ValueError, match="^query_features have dimension 3 but gallery_features"):
        reranking_candidates(query[:, :3], gallery, 2, device="cpu")


def test_cuhk03_checks_its_number_of_repeats():
    query, gallery, ids = _problem(1)
    with pytest.raises(ValueError, match="num_repeats"):
        evaluate_reid(query, gallery, *ids, protocol="cuhk03", num_repeats=0, device="cpu")


def test_summary_keys():
    query, gallery, ids = _problem(2)
    result = evaluate_reid(query, gallery, *ids, device="cpu")
    summary = result.as_dict()
    assert list(summary) == [
        "mAP", "mINP", "cmc", "num_valid_queries", "num_skipped_queries", "per_camera",
        "per_identity",
    ]  # fmt: skip
    assert summary["mINP"] == result.mINP
    assert summary["per_identity"] == {str(p): row for p, row in result.per_identity().items()}


def test_feature_blocks_follow_block_bytes(monkeypatch):
    from evaluation.reid import protocol

    seen = []
    original = protocol.DistanceBlocks.from_features

    def recording(*args):
        seen.append(args[-1])
        return original(*args)

    monkeypatch.setattr(protocol.DistanceBlocks, "from_features", recording)
    query, gallery, ids = _problem(3)
    evaluate_reid(query, gallery, *ids, device="cpu", block_bytes=60 * 4 * 5)
    assert seen == [5]  # rows of 60 float32 distances per 1,200 bytes
