import json

import numpy as np
import pytest

from evaluation.reid import evaluate_reid, evaluate_reid_from_distances, pairwise_distances
from evaluation.reid.bootstrap import bootstrap_reid


def make_problem(seed, num_query=60, num_gallery=200, dim=8, num_ids=15):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_ids, dim))
    q_pids, g_pids = rng.integers(0, num_ids, num_query), rng.integers(0, num_ids, num_gallery)
    q_camids, g_camids = rng.integers(0, 4, num_query), rng.integers(0, 4, num_gallery)
    query = (centres[q_pids] + rng.normal(size=(num_query, dim))).astype(np.float32)
    gallery = (centres[g_pids] + rng.normal(size=(num_gallery, dim))).astype(np.float32)
    return query, gallery, (q_pids, g_pids, q_camids, g_camids)


@pytest.mark.parametrize("protocol", ["market1501", "cuhk03"])
def test_per_query_values_reproduce_the_totals(protocol):
    query, gallery, ids = make_problem(0)
    result = evaluate_reid(query, gallery, *ids, protocol=protocol, max_rank=20, device="cpu")
    valid = ~np.isnan(result.average_precision)
    assert np.isnan(result.inverse_negative_penalty[~valid]).all()
    np.testing.assert_allclose(np.nanmean(result.inverse_negative_penalty), result.mINP)
    first = result.first_positive_ranks[valid]
    assert (result.first_positive_ranks[~valid] == 0).all() and (first >= 1).all()
    hits = np.stack([(first <= k).mean(axis=1) for k in range(1, 21)], axis=1)
    np.testing.assert_allclose(hits.mean(axis=0), result.cmc, rtol=1e-12)


def test_per_camera_and_per_identity_equal_subset_evaluations():
    query, gallery, ids = make_problem(1)
    q_pids, g_pids, q_camids, g_camids = ids
    result = evaluate_reid(query, gallery, *ids, device="cpu")
    for name, groups in (("per_camera", q_camids), ("per_identity", q_pids)):
        breakdown = getattr(result, name)()
        assert sorted(breakdown) == sorted(set(groups.tolist()))
        for group, row in breakdown.items():
            members = groups == group
            assert row["num_valid_queries"] + row["num_skipped_queries"] == members.sum()
            if row["num_valid_queries"] == 0:
                assert row["mAP"] is None
                continue
            subset = evaluate_reid(
                query[members],
                gallery,
                q_pids[members],
                g_pids,
                q_camids[members],
                g_camids,
                device="cpu",
            )
            assert row["mAP"] == pytest.approx(subset.mAP, rel=1e-12)
            assert row["mINP"] == pytest.approx(subset.mINP, rel=1e-12)
            assert row["rank1"] == pytest.approx(subset.rank(1), rel=1e-12)
    summary = json.loads(json.dumps(result.as_dict()))
    assert set(summary["per_camera"]) == {str(c) for c in set(q_camids.tolist())}
    assert "intervals" not in summary


def reference_bootstrap(result, num_resamples, seed, confidence):
    """Resample query identities and recompute the metrics by brute force, resample by resample."""
    valid = ~np.isnan(result.average_precision)
    pids = result.query_pids
    identities = np.unique(pids[valid])
    draws = np.random.default_rng(seed).integers(
        0, len(identities), (num_resamples, len(identities))
    )
    rows = {"mAP": [], "mINP": [], "cmc": []}
    for draw in draws:
        queries = np.concatenate([np.flatnonzero(valid & (pids == identities[d])) for d in draw])
        rows["mAP"].append(result.average_precision[queries].mean())
        rows["mINP"].append(result.inverse_negative_penalty[queries].mean())
        first = result.first_positive_ranks[queries, 0]
        rows["cmc"].append([(first <= k).mean() for k in range(1, len(result.cmc) + 1)])
    q = [50 * (1 - confidence), 50 * (1 + confidence)]
    return {name: np.percentile(np.array(values), q, axis=0) for name, values in rows.items()}


def test_bootstrap_equals_brute_force_resampling():
    query, gallery, ids = make_problem(2)
    result = evaluate_reid(query, gallery, *ids, max_rank=10, device="cpu")
    intervals = bootstrap_reid(result, num_resamples=200, seed=5, confidence=0.9)
    expected = reference_bootstrap(result, 200, 5, 0.9)
    np.testing.assert_allclose([intervals.mAP_low, intervals.mAP_high], expected["mAP"], rtol=1e-12)
    np.testing.assert_allclose(
        [intervals.mINP_low, intervals.mINP_high], expected["mINP"], rtol=1e-12
    )
    np.testing.assert_allclose(intervals.cmc_low, expected["cmc"][0], rtol=1e-12)
    np.testing.assert_allclose(intervals.cmc_high, expected["cmc"][1], rtol=1e-12)
    assert intervals.mAP_low < result.mAP < intervals.mAP_high
    assert intervals.rank(1) == (intervals.cmc_low[0], intervals.cmc_high[0])


def test_bootstrap_option_is_seeded_and_exported():
    query, gallery, ids = make_problem(3)
    distances = pairwise_distances(query, gallery, device="cpu")
    first = evaluate_reid_from_distances(distances, *ids, bootstrap=100, seed=1)
    again = evaluate_reid(query, gallery, *ids, bootstrap=100, seed=1, device="cpu")
    other = evaluate_reid(query, gallery, *ids, bootstrap=100, seed=2, device="cpu")
    assert first.intervals.as_dict() == again.intervals.as_dict()
    assert other.intervals.as_dict() != first.intervals.as_dict()
    summary = json.loads(json.dumps(first.as_dict()))
    assert summary["intervals"]["num_resamples"] == 100
    assert summary["intervals"]["mAP"][0] <= first.mAP <= summary["intervals"]["mAP"][1]


def test_bad_bootstrap_input():
    query, gallery, ids = make_problem(4)
    result = evaluate_reid(query, gallery, *ids, device="cpu")
    for resamples, confidence in ((0, 0.95), (True, 0.95), (10, 1.0), (10, 0.0)):
        with pytest.raises(ValueError):
            bootstrap_reid(result, resamples, confidence=confidence)
    bare = type(result)(result.cmc, result.mAP, result.mINP, result.average_precision, 1, 0)
    with pytest.raises(ValueError, match="evaluate_reid"):
        bare.bootstrap(10)
    with pytest.raises(ValueError, match="evaluate_reid"):
        bare.per_camera()


def test_a_result_without_per_query_ranks_cannot_be_resampled():
    from evaluation.reid import ReIDResult

    bare = ReIDResult(np.ones(3), 1.0, 1.0, np.ones(2), 2, 0)
    with pytest.raises(
        ValueError, match="^this result carries no per-query ranks: build it with evaluate_reid$"
    ):
        bootstrap_reid(bare)
