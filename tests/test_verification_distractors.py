import numpy as np
import pytest

from evaluation.verification.distractors import (
    default_distractor_counts,
    identification_with_distractors,
)


def make_problem(seed, num_probes=40, num_gallery=25, num_distractors=300, dim=16):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(30, dim))
    gallery_ids = rng.integers(0, 20, num_gallery)  # ids 20..29 never in the gallery
    probe_ids = rng.integers(0, 30, num_probes)
    gallery = centres[gallery_ids] + 0.9 * rng.normal(size=(num_gallery, dim))
    probes = centres[probe_ids] + 0.9 * rng.normal(size=(num_probes, dim))
    distractors = rng.normal(size=(num_distractors, dim)) * 1.2
    return probes, probe_ids, gallery, gallery_ids, distractors


def reference_rates(probes, probe_ids, gallery, gallery_ids, distractors, counts, ranks):
    """Search every probe in gallery + first n distractors, for each n, by brute force."""
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    rows = []
    mated = np.isin(probe_ids, gallery_ids)
    for count in counts:
        database = unit(np.concatenate([gallery, distractors[:count]]))
        labels = np.concatenate([gallery_ids, np.full(count, -1)])
        scores = unit(probes) @ database.T
        probe_ranks = []
        for probe in np.flatnonzero(mated):
            is_mate = labels == probe_ids[probe]
            best = scores[probe, is_mate].max()
            probe_ranks.append(1 + np.count_nonzero(scores[probe, ~is_mate] >= best))
        rows.append([np.mean(np.array(probe_ranks) <= k) for k in ranks])
    return np.array(rows), int(mated.sum())


@pytest.mark.parametrize("block_rows", [7, 64, 10_000])
def test_curve_equals_brute_force_search(block_rows):
    problem = make_problem(0)
    counts = [0, 5, 10, 10, 100, 163, 300]
    ranks = (1, 2, 5)
    curve = identification_with_distractors(
        *problem, distractor_counts=counts, ranks=ranks, block_rows=block_rows
    )
    expected, num_mated = reference_rates(*problem, counts, ranks)
    np.testing.assert_array_equal(curve.rates, expected)
    assert curve.num_mated == num_mated and curve.num_non_mated == 40 - num_mated
    assert (np.diff(curve.rates[:, 0]) <= 0).all()  # more distractors never help
    assert curve.rates[-1, 0] < curve.rates[0, 0]  # and here they do hurt
    summary = curve.as_dict()
    assert summary["curve"][0] == {
        "distractors": 0,
        **dict(zip(("rank1", "rank2", "rank5"), expected[0], strict=True)),
    }


def test_default_counts_and_memory_mapped_distractors(tmp_path):
    assert default_distractor_counts(1000).tolist() == [0, 10, 100, 1000]
    assert default_distractor_counts(1234).tolist() == [0, 10, 100, 1000, 1234]
    problem = make_problem(1)
    path = tmp_path / "distractors.npy"
    np.save(path, problem[4].astype(np.float32))
    mapped = np.load(path, mmap_mode="r")
    curve = identification_with_distractors(*problem[:4], mapped, block_rows=50)
    expected, _ = reference_rates(
        *problem[:4], problem[4].astype(np.float32), [0, 10, 100, 300], (1, 5, 10)
    )
    assert curve.distractor_counts.tolist() == [0, 10, 100, 300]
    np.testing.assert_array_equal(curve.rates, expected)


def test_bad_distractor_input():
    probes, probe_ids, gallery, gallery_ids, distractors = make_problem(2, num_distractors=20)
    args = (probes, probe_ids, gallery, gallery_ids)
    with pytest.raises(ValueError, match="dimension"):
        identification_with_distractors(*args, distractors[:, :3])
    with pytest.raises(ValueError, match="2-D float"):
        identification_with_distractors(*args, distractors[0])
    with pytest.raises(ValueError, match="non-decreasing"):
        identification_with_distractors(*args, distractors, distractor_counts=[10, 5])
    with pytest.raises(ValueError, match="non-decreasing"):
        identification_with_distractors(*args, distractors, distractor_counts=[21])
    with pytest.raises(ValueError, match="ranks"):
        identification_with_distractors(*args, distractors, ranks=(0,))
    with pytest.raises(ValueError, match="no probe subject"):
        identification_with_distractors(probes, probe_ids + 100, gallery, gallery_ids, distractors)
    bad = distractors.copy()
    bad[15, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        identification_with_distractors(*args, bad, block_rows=4)


def test_a_distractor_tied_with_the_mate_counts_ahead_of_it():
    # Each probe's mate reappears among the distractors: the same vector, so in float32 the same
    # score. The tie rule counts a non-mate whose score equals the mate's as ahead, so rank-1 is 0
    # once that distractor is in, and still 1 at rank 2.
    rng = np.random.default_rng(5)
    gallery = rng.normal(size=(40, 24)) * rng.uniform(0.5, 3.0, size=(40, 1))
    probes = gallery + 0.3 * rng.normal(size=gallery.shape)
    ids = np.arange(40)
    curve = identification_with_distractors(
        probes, ids, gallery, ids, gallery.copy(), distractor_counts=[0, 40], ranks=(1, 2)
    )
    np.testing.assert_array_equal(curve.rates, [[1.0, 1.0], [0.0, 1.0]])


def test_unreadable_distractors_are_named():
    problem = make_problem(3, num_distractors=10)
    with pytest.raises(ValueError, match="^distractor_features cannot be read as an array"):
        identification_with_distractors(*problem[:4], [[1.0, 2.0], [3.0]])
