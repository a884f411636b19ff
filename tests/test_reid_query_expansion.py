import numpy as np
import pytest

from evaluation.reid import evaluate_reid
from evaluation.reid.query_expansion import QueryExpansionOptions, expand_queries


def reference_expansion(query, gallery, k, alpha, times):
    """fast-reid's α-QE written out: weighted mean of the raw features of the k most similar."""
    features = np.concatenate([query, gallery]).astype(np.float64)
    for _ in range(times):
        unit = features / np.linalg.norm(features, axis=1, keepdims=True)
        similarities = unit @ unit.T
        nearest = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
        weights = np.take_along_axis(similarities, nearest, 1) ** alpha
        features = (features[nearest] * weights[:, :, None]).mean(axis=1)
    return features[: len(query)], features[len(query) :]


def make_problem(seed, num_query=20, num_gallery=70, dim=12):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, dim)) * 2
    q_pids, g_pids = rng.integers(0, 6, num_query), rng.integers(0, 6, num_gallery)
    q_camids, g_camids = rng.integers(0, 3, num_query), rng.integers(0, 3, num_gallery)
    query = (centres[q_pids] + rng.normal(size=(num_query, dim))).astype(np.float32)
    gallery = (centres[g_pids] + rng.normal(size=(num_gallery, dim))).astype(np.float32)
    return query, gallery, (q_pids, g_pids, q_camids, g_camids)


@pytest.mark.parametrize(
    ("k", "alpha", "times"), [(5, 3.0, 1), (5, 0.0, 1), (3, 1.5, 2), (1, 3, 1)]
)
def test_expansion_equals_the_formula(k, alpha, times):
    query, gallery, _ = make_problem(0)
    ours = expand_queries(query, gallery, QueryExpansionOptions(k, alpha, times))
    expected = reference_expansion(query, gallery, k, alpha, times)
    for mine, theirs in zip(ours, expected, strict=True):
        assert mine.dtype == np.float32
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    if k == 1:  # each item is its own nearest, with weight 1
        np.testing.assert_allclose(ours[0], query, rtol=1e-6)


@pytest.mark.parametrize(("name", "alpha"), [("average", 0.0), ("alpha", 3.0)])
def test_named_expansions_in_the_evaluator(name, alpha):
    query, gallery, ids = make_problem(1)
    expanded = reference_expansion(query, gallery, 5, alpha, 1)
    expected = evaluate_reid(*expanded, *ids, metric="cosine", device="cpu")
    result = evaluate_reid(
        query, gallery, *ids, metric="cosine", query_expansion=name, device="cpu"
    )
    np.testing.assert_array_equal(result.cmc, expected.cmc)
    np.testing.assert_allclose(result.average_precision, expected.average_precision, rtol=1e-12)
    assert result.mAP != evaluate_reid(query, gallery, *ids, metric="cosine", device="cpu").mAP


def test_expansion_then_reranking():
    query, gallery, ids = make_problem(2)
    expanded = expand_queries(query, gallery, QueryExpansionOptions(alpha=0.0))
    expected = evaluate_reid(*expanded, *ids, rerank=True, device="cpu")
    result = evaluate_reid(
        query, gallery, *ids, rerank=True, query_expansion={"alpha": 0.0}, device="cpu"
    )
    np.testing.assert_array_equal(result.average_precision, expected.average_precision)


def test_bad_query_expansion_input():
    query, gallery, ids = make_problem(3, num_query=2, num_gallery=3)
    for bad in ({"k": 0}, {"times": 0}, {"alpha": -1.0}, {"alpha": float("nan")}, {"k": 2.5}):
        with pytest.raises(ValueError):
            QueryExpansionOptions(**bad)
    with pytest.raises(ValueError, match="k must lie in"):
        expand_queries(query, gallery, QueryExpansionOptions(k=6))
    with pytest.raises(ValueError, match="query_expansion must be one of"):
        evaluate_reid(query, gallery, *ids, query_expansion="diffusion")
    with pytest.raises(TypeError, match="query_expansion"):
        evaluate_reid(query, gallery, *ids, query_expansion=3)
    zero = np.zeros((2, 12), dtype=np.float32)
    with pytest.raises(ValueError, match="zero feature"):
        expand_queries(zero, gallery)
    # Opposite directions: a negative similarity to a non-integer power is not a number.
    opposed = np.array([[1.0, 0.0], [-1.0, 0.0]], dtype=np.float32)
    with pytest.raises(ValueError, match="non-finite"):
        expand_queries(opposed[:1], opposed[1:], QueryExpansionOptions(k=2, alpha=0.5))
