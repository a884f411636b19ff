import numpy as np
import pytest

from evaluation.reid import evaluate_reid
from evaluation.reid.top_k import cmc_from_top_k, reranking_candidates


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_top_k_cmc_equals_exact_cmc(metric):
    # Continuous features: no near-ties, so FAISS's distances rank like torch's.
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 8))
    q_pids, g_pids = rng.integers(0, 10, 40), rng.integers(0, 10, 200)
    q_camids, g_camids = rng.integers(0, 2, 40), rng.integers(0, 2, 200)
    query = (centres[q_pids] + rng.normal(size=(40, 8))).astype(np.float32)
    gallery = (centres[g_pids] + rng.normal(size=(200, 8))).astype(np.float32)
    ids = (q_pids, g_pids, q_camids, g_camids)
    cmc, num_valid = cmc_from_top_k(query, gallery, *ids, metric=metric, max_rank=15)
    exact = evaluate_reid(query, gallery, *ids, metric=metric, max_rank=15, device="cpu")
    np.testing.assert_array_equal(cmc, exact.cmc)
    assert num_valid == exact.num_valid_queries


def test_top_k_cmc_bad_input():
    good = np.ones((2, 3), dtype=np.float32)
    ids = (np.array([0, 1]), np.array([0, 1]), np.array([0, 0]), np.array([1, 1]))
    with pytest.raises(ValueError, match="metric"):
        cmc_from_top_k(good, good, *ids, metric="ip")
    with pytest.raises(ValueError, match="no query has a positive"):
        cmc_from_top_k(good, good, ids[0], ids[1], ids[2], ids[2])
    with pytest.raises(ValueError, match="g_pids has 1 entries"):
        cmc_from_top_k(good, good, ids[0], ids[1][:1], ids[2], ids[3])
    with pytest.raises(ValueError, match="max_rank"):
        cmc_from_top_k(good, good, *ids, max_rank=0)
    with pytest.raises(ValueError, match="max_rank"):
        cmc_from_top_k(good, good, *ids, max_rank=True)
    with pytest.raises(ValueError, match="query set is empty|query_features is empty"):
        cmc_from_top_k(good[:0], good, ids[0][:0], ids[1], ids[2][:0], ids[3])


def test_top_k_cmc_clips_max_rank_to_the_gallery():
    rng = np.random.default_rng(3)
    query, gallery = rng.normal(size=(6, 4)), rng.normal(size=(9, 4))
    ids = (rng.integers(0, 3, 6), rng.integers(0, 3, 9), np.zeros(6, int), np.ones(9, int))
    cmc, _ = cmc_from_top_k(query, gallery, *ids, max_rank=np.int64(50))
    exact = evaluate_reid(query, gallery, *ids, max_rank=50, device="cpu")
    assert cmc.shape == (9,)
    np.testing.assert_array_equal(cmc, exact.cmc)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_reranking_candidates_are_the_joint_nearest_neighbours(metric):
    rng = np.random.default_rng(4)
    query, gallery = rng.normal(size=(7, 6)), rng.normal(size=(30, 6))
    joint = np.concatenate([query, gallery])
    if metric == "cosine":
        unit = joint / np.linalg.norm(joint, axis=1, keepdims=True)
        expected = 1 - unit @ unit.T
    else:
        expected = ((joint[:, None, :] - joint[None]) ** 2).sum(-1)
    distances, indices = reranking_candidates(query, gallery, 5, metric=metric)
    assert distances.shape == indices.shape == (37, 5)
    np.testing.assert_array_equal(indices, np.argsort(expected, axis=1, kind="stable")[:, :5])
    np.testing.assert_array_equal(indices[:, 0], np.arange(37))  # each item is its own nearest
    np.testing.assert_allclose(
        distances, np.take_along_axis(expected, indices, 1), rtol=1e-5, atol=1e-5
    )


def test_reranking_candidates_bad_input():
    good = np.ones((2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="metric"):
        reranking_candidates(good, good, 2, metric="ip")
    with pytest.raises(ValueError, match="dimension"):
        reranking_candidates(good, good[:, :2], 2)
    with pytest.raises(ValueError, match="k must"):
        reranking_candidates(good, good, 5)
    with pytest.raises(ValueError, match="gallery_features contains NaN"):
        reranking_candidates(good, np.full((2, 3), np.nan), 2)
