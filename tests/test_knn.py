import numpy as np
import pytest

from evaluation.knn import top_k


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_top_k_matches_brute_force(metric):
    rng = np.random.default_rng(0)
    queries, database = rng.normal(size=(7, 5)), rng.normal(size=(40, 5))
    if metric == "cosine":
        q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        d = database / np.linalg.norm(database, axis=1, keepdims=True)
        expected = q @ d.T
    elif metric == "ip":
        expected = queries @ database.T
    else:
        expected = -((queries[:, None, :] - database[None]) ** 2).sum(-1)
    scores, indices = top_k(queries, database, k=6, metric=metric)
    np.testing.assert_array_equal(indices, np.argsort(-expected, axis=1, kind="stable")[:, :6])
    np.testing.assert_allclose(
        scores, np.take_along_axis(expected, indices, 1), rtol=1e-5, atol=1e-5
    )


def test_top_k_bad_input():
    good = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="metric"):
        top_k(good, good, 1, metric="manhattan")
    with pytest.raises(ValueError, match="dimension"):
        top_k(good, np.ones((3, 5)), 1)
    with pytest.raises(ValueError, match="k must"):
        top_k(good, good, 4)
    with pytest.raises(ValueError, match="NaN"):
        top_k(np.full((2, 4), np.nan), good, 1)
    with pytest.raises(ValueError, match="device='cuda:0' but faiss-gpu"):
        top_k(good, good, 1, device="cuda")
