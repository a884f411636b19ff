import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from references import reference_reid

from evaluation.reid import evaluate_reid, evaluate_reid_from_distances, pairwise_distances


def make_ids(rng, num_query, num_gallery, num_ids=12, num_cams=3):
    return (
        rng.integers(0, num_ids, num_query),
        rng.integers(0, num_ids, num_gallery),
        rng.integers(0, num_cams, num_query),
        rng.integers(0, num_cams, num_gallery),
    )


def assert_matches_reference(result, distmat, ids, max_rank=50):
    reference = reference_reid(distmat, *ids, max_rank=max_rank)
    cmc, mean_ap, minp = reference.cmc, reference.mAP, reference.mINP
    per_query_ap, skipped = reference.average_precision, reference.num_skipped_queries
    np.testing.assert_array_equal(result.cmc, cmc)
    assert abs(result.mAP - mean_ap) < 1e-9
    assert abs(result.mINP - minp) < 1e-9
    np.testing.assert_allclose(result.average_precision, per_query_ap, rtol=0, atol=1e-12)
    assert result.num_skipped_queries == skipped
    assert result.num_valid_queries == len(distmat) - skipped


@pytest.mark.parametrize("seed", range(4))
def test_matches_reference_on_tie_free_distances(seed):
    rng = np.random.default_rng(seed)
    ids = make_ids(rng, 40, 300)
    distmat = rng.random((40, 300))
    result = evaluate_reid_from_distances(distmat, *ids, max_rank=20)
    assert_matches_reference(result, distmat, ids, max_rank=20)


@pytest.mark.parametrize("seed", range(4))
def test_ties_follow_gallery_index_order(seed):
    rng = np.random.default_rng(seed)
    ids = make_ids(rng, 40, 300)
    distmat = rng.integers(0, 5, (40, 300)).astype(np.float32)
    result = evaluate_reid_from_distances(distmat, *ids)
    assert_matches_reference(result, distmat, ids)


def test_tie_rule_on_a_hand_made_case():
    # Query pid 1 camera 0; all distances equal: kept order is gallery order.
    g_pids = np.array([2, 1, 1, 3, 1])
    g_camids = np.array([1, 0, 1, 1, 2])  # gallery item 1 is junk (same pid and camera)
    result = evaluate_reid_from_distances(np.zeros((1, 5)), [1], g_pids, [0], g_camids)
    # Kept list: 2, 1(c1), 3, 1(c2) -> positives at ranks 2 and 4.
    assert result.cmc[0] == 0 and result.cmc[1] == 1
    assert result.mAP == pytest.approx((1 / 2 + 2 / 4) / 2, abs=1e-15)
    assert result.mINP == pytest.approx(2 / 4, abs=1e-15)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    num_query=st.integers(1, 8),
    num_gallery=st.integers(1, 40),
    num_ids=st.integers(1, 6),
    levels=st.integers(1, 6),
)
def test_matches_reference_property(seed, num_query, num_gallery, num_ids, levels):
    rng = np.random.default_rng(seed)
    ids = make_ids(rng, num_query, num_gallery, num_ids, num_cams=2)
    distmat = rng.integers(0, levels, (num_query, num_gallery)).astype(np.float64)
    if reference_reid(distmat, *ids).num_skipped_queries == num_query:
        with pytest.raises(ValueError, match="no query has a positive"):
            evaluate_reid_from_distances(distmat, *ids)
        return
    result = evaluate_reid_from_distances(distmat, *ids, max_rank=10)
    assert_matches_reference(result, distmat, ids, max_rank=10)
    assert np.all(np.diff(result.cmc) >= 0) and 0 <= result.cmc[0] <= result.cmc[-1] <= 1
    assert 0 < result.mINP <= 1 and 0 < result.mAP <= 1


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_invariant_to_gallery_and_query_permutation(seed):
    rng = np.random.default_rng(seed)
    q_pids, g_pids, q_camids, g_camids = make_ids(rng, 10, 60, num_ids=4)
    distmat = rng.random((10, 60))  # tie-free, so the gallery order does not matter
    gallery_perm, query_perm = rng.permutation(60), rng.permutation(10)
    base = evaluate_reid_from_distances(distmat, q_pids, g_pids, q_camids, g_camids)
    moved = evaluate_reid_from_distances(
        distmat[query_perm][:, gallery_perm],
        q_pids[query_perm],
        g_pids[gallery_perm],
        q_camids[query_perm],
        g_camids[gallery_perm],
    )
    np.testing.assert_array_equal(base.cmc, moved.cmc)
    np.testing.assert_allclose(moved.average_precision, base.average_precision[query_perm])
    assert moved.mINP == pytest.approx(base.mINP, abs=1e-12)


def test_perfect_ranking_scores_one():
    g_pids = np.repeat(np.arange(5), 4)
    g_camids = np.tile(np.arange(4), 5)
    q_pids, q_camids = np.arange(5), np.full(5, 9)
    distmat = (q_pids[:, None] != g_pids[None]).astype(float)
    result = evaluate_reid_from_distances(distmat, q_pids, g_pids, q_camids, g_camids)
    assert result.mAP == 1 and result.mINP == 1 and np.all(result.cmc == 1)


def test_skipped_queries_are_counted_and_max_rank_clipped():
    g_pids, g_camids = np.array([0, 0, 1, 2]), np.array([0, 1, 0, 0])
    q_pids, q_camids = np.array([0, 1, 7]), np.array([0, 0, 0])
    distmat = np.random.default_rng(0).random((3, 4))
    result = evaluate_reid_from_distances(distmat, q_pids, g_pids, q_camids, g_camids)
    assert result.num_valid_queries == 1 and result.num_skipped_queries == 2
    assert len(result.cmc) == 4
    assert np.isnan(result.average_precision[1:]).all()


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("block_bytes", [1, 8 * 50 * 7, 2**30])
def test_blocked_features_equal_distances(metric, block_bytes):
    # Like with like: the distance matrix comes from the same computation in the same blocks.
    rng = np.random.default_rng(3)
    ids = make_ids(rng, 30, 50, num_ids=6)
    query, gallery = rng.normal(size=(30, 16)), rng.normal(size=(50, 16))
    block_rows = max(1, block_bytes // (50 * 8))
    from evaluation.reid import DistanceBlocks

    distmat = DistanceBlocks.from_features(query, gallery, metric, "cpu", block_rows).dense()
    from_features = evaluate_reid(
        query, gallery, *ids, metric=metric, device="cpu", block_bytes=block_bytes
    )
    from_distances = evaluate_reid_from_distances(distmat, *ids)
    np.testing.assert_array_equal(from_features.cmc, from_distances.cmc)
    np.testing.assert_array_equal(from_features.average_precision, from_distances.average_precision)
    assert from_features.mINP == from_distances.mINP
    assert_matches_reference(from_features, distmat, ids)


def test_metric_conventions():
    rng = np.random.default_rng(4)
    query, gallery = rng.normal(size=(6, 5)), rng.normal(size=(9, 5)) * 3
    squared = ((query[:, None] - gallery[None]) ** 2).sum(-1)
    np.testing.assert_allclose(pairwise_distances(query, gallery, "euclidean"), squared, atol=1e-9)
    unit_q = query / np.linalg.norm(query, axis=1, keepdims=True)
    unit_g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    np.testing.assert_allclose(
        pairwise_distances(query, gallery, "cosine"), 1 - unit_q @ unit_g.T, atol=1e-12
    )
    # Cosine is scale-free; squared euclidean on raw features is not.
    ids = make_ids(rng, 6, 9, num_ids=3, num_cams=2)
    ids = (ids[0], ids[1], np.zeros(6, int), np.ones(9, int))
    rescaled = gallery * rng.uniform(0.1, 10, (9, 1))
    cosine = evaluate_reid(query, gallery, *ids, metric="cosine", device="cpu")
    cosine_rescaled = evaluate_reid(query, rescaled, *ids, metric="cosine", device="cpu")
    assert cosine.mAP == pytest.approx(cosine_rescaled.mAP, abs=1e-12)
    # On normalised features, squared euclidean = 2 - 2 cos: the same ranking.
    euclidean_unit = evaluate_reid(unit_q, unit_g, *ids, metric="euclidean", device="cpu")
    assert euclidean_unit.mAP == pytest.approx(cosine.mAP, abs=1e-12)


def test_default_device_falls_back_to_cpu():
    import torch

    rng = np.random.default_rng(5)
    ids = make_ids(rng, 20, 80, num_ids=5)
    query, gallery = rng.normal(size=(20, 8)).astype(np.float32), rng.normal(size=(80, 8))
    gallery = gallery.astype(np.float32)
    default = evaluate_reid(query, gallery, *ids)
    cpu = evaluate_reid(query, gallery, *ids, device="cpu")
    np.testing.assert_array_equal(default.cmc, cpu.cmc)
    assert default.mAP == cpu.mAP and default.mINP == cpu.mINP
    tensors = evaluate_reid(torch.from_numpy(query), torch.from_numpy(gallery), *ids)
    assert tensors.mAP == cpu.mAP


def test_float16_features_are_widened():
    rng = np.random.default_rng(6)
    ids = make_ids(rng, 10, 40, num_ids=4)
    query, gallery = rng.normal(size=(10, 8)), rng.normal(size=(40, 8))
    half = evaluate_reid(query.astype(np.float16), gallery.astype(np.float16), *ids, device="cpu")
    distmat = pairwise_distances(
        query.astype(np.float16).astype(np.float32), gallery.astype(np.float16).astype(np.float32)
    )
    assert_matches_reference(half, distmat, ids)


def reference_cuhk03(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, num_repeats, seed):
    """Single-gallery-shot CMC with the documented sampling, ranked by a full stable argsort."""
    rng = np.random.default_rng(seed)
    unique_pids = np.unique(g_pids)
    all_cmc = []
    for i in range(len(q_pids)):
        kept = ~((g_pids == q_pids[i]) & (g_camids == q_camids[i]))
        if not (kept & (g_pids == q_pids[i])).any():
            continue
        draws = rng.random((num_repeats, len(unique_pids)))
        cmc = np.zeros(max_rank)
        for repeat in range(num_repeats):
            sampled = []
            for column, pid in enumerate(unique_pids):
                members = np.flatnonzero((g_pids == pid) & kept)
                sampled.append(members[int(draws[repeat, column] * len(members))])
            sampled = np.sort(sampled)  # gallery-index order, for the tie rule
            order = sampled[np.argsort(distmat[i, sampled], kind="stable")]
            first = np.flatnonzero(g_pids[order] == q_pids[i])[0] + 1
            cmc += np.arange(1, max_rank + 1) >= first
        all_cmc.append(cmc / num_repeats)
    return np.mean(all_cmc, axis=0)


@pytest.mark.parametrize("integer_distances", [False, True])
def test_cuhk03_single_gallery_shot(integer_distances):
    rng = np.random.default_rng(7)
    ids = make_ids(rng, 25, 120, num_ids=10, num_cams=2)
    distmat = rng.integers(0, 4, (25, 120)) if integer_distances else rng.random((25, 120))
    distmat = distmat.astype(np.float64)
    result = evaluate_reid_from_distances(distmat, *ids, max_rank=10, protocol="cuhk03", seed=11)
    expected = reference_cuhk03(distmat, *ids, max_rank=10, num_repeats=10, seed=11)
    np.testing.assert_allclose(result.cmc, expected, rtol=0, atol=1e-12)
    full = evaluate_reid_from_distances(distmat, *ids)
    assert result.mAP == full.mAP and result.mINP == full.mINP  # AP from the full list
    again = evaluate_reid_from_distances(distmat, *ids, max_rank=10, protocol="cuhk03", seed=11)
    np.testing.assert_array_equal(again.cmc, result.cmc)
    other = evaluate_reid_from_distances(distmat, *ids, max_rank=10, protocol="cuhk03", seed=12)
    assert not np.array_equal(other.cmc, result.cmc)


def test_cuhk03_from_blocked_features_matches_distances():
    rng = np.random.default_rng(8)
    ids = make_ids(rng, 20, 60, num_ids=8, num_cams=2)
    query, gallery = rng.normal(size=(20, 4)), rng.normal(size=(60, 4))
    blocked = evaluate_reid(
        query, gallery, *ids, protocol="cuhk03", device="cpu", block_bytes=60 * 8 * 3
    )
    from evaluation.reid import DistanceBlocks

    distmat = DistanceBlocks.from_features(query, gallery, "euclidean", "cpu", 3).dense()
    expected = reference_cuhk03(distmat, *ids, max_rank=50, num_repeats=10, seed=0)
    np.testing.assert_allclose(blocked.cmc, expected, rtol=0, atol=1e-12)


def test_bad_inputs():
    rng = np.random.default_rng(9)
    q, g = rng.normal(size=(4, 3)), rng.normal(size=(6, 3))
    ids = (np.array([0, 1, 0, 1]), np.array([0, 1, 0, 1, 0, 1]), np.zeros(4, int), np.ones(6, int))
    with pytest.raises(ValueError, match="g_pids has 5 entries"):
        evaluate_reid(q, g, ids[0], ids[1][:5], ids[2], ids[3])
    with pytest.raises(ValueError, match="q_camids"):
        evaluate_reid(q, g, ids[0], ids[1], ids[2][:3], ids[3])
    bad = q.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="query_features contains NaN"):
        evaluate_reid(bad, g, *ids)
    with pytest.raises(ValueError, match="distmat contains NaN"):
        evaluate_reid_from_distances(np.full((4, 6), np.inf), *ids)
    with pytest.raises(ValueError, match="query_features is empty"):
        evaluate_reid(q[:0], g, ids[0][:0], *ids[1:2], ids[2][:0], ids[3])
    with pytest.raises(ValueError, match="gallery_features is empty"):
        evaluate_reid(q, g[:0], ids[0], ids[1][:0], ids[2], ids[3][:0])
    with pytest.raises(ValueError, match="gallery is empty"):
        evaluate_reid_from_distances(np.zeros((4, 0)), ids[0], ids[1][:0], ids[2], ids[3][:0])
    with pytest.raises(ValueError, match="query set is empty"):
        evaluate_reid_from_distances(np.zeros((0, 6)), ids[0][:0], ids[1], ids[2][:0], ids[3])
    with pytest.raises(ValueError, match="no query has a positive"):
        evaluate_reid(q, g, ids[0], ids[1], ids[2], np.zeros(6, int))
    with pytest.raises(ValueError, match="dimension"):
        evaluate_reid(q, g[:, :2], *ids)
    with pytest.raises(ValueError, match="metric"):
        evaluate_reid(q, g, *ids, metric="manhattan")
    with pytest.raises(ValueError, match="max_rank"):
        evaluate_reid(q, g, *ids, max_rank=0)
    with pytest.raises(ValueError, match="protocol"):
        evaluate_reid(q, g, *ids, protocol="matlab")
    with pytest.raises(ValueError, match="q_pids must hold integers"):
        evaluate_reid(q, g, ids[0].astype(float), *ids[1:])
    with pytest.raises(ValueError, match="zero feature vector"):
        evaluate_reid(np.zeros((4, 3)), g, *ids, metric="cosine")
    with pytest.raises(ValueError, match="distmat must be 2-D"):
        evaluate_reid_from_distances(np.zeros(6), *ids)
