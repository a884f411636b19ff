import json

import numpy as np
import pytest

from evaluation.verification import verification_report
from evaluation.verification.bootstrap import (
    BAND_POINTS,
    _ScoreBlocks,
    bootstrap_verification,
    weighted_metrics,
)

TARGETS = np.array([1e-3, 1e-2, 0.1, 0.5])


def make_pairs(seed, num_pairs=400, levels=None):
    rng = np.random.default_rng(seed)
    labels = rng.random(num_pairs) < 0.3
    scores = rng.normal(size=num_pairs) + 1.5 * labels
    if levels is not None:  # heavy ties
        scores = np.round(scores * levels) / levels
    return scores, labels


def report_values(report):
    return np.concatenate([[report.auc, report.eer], report.tar_at_far_threshold])


def blocks_by_definition(scores, labels):
    """Descending distinct scores; a score holding a genuine pair is a block of its own, each
    maximal stretch of impostor-only scores one block. Returns the pairs of each block."""
    distinct = np.unique(scores)[::-1]
    blocks, stretch = [], []
    for value in distinct:
        members = np.flatnonzero(scores == value)
        if labels[members].any():
            if stretch:
                blocks.append(np.concatenate(stretch))
                stretch = []
            blocks.append(members)
        else:
            stretch.append(members)
    if stretch:
        blocks.append(np.concatenate(stretch))
    return blocks


@pytest.mark.parametrize("levels", [None, 4])
def test_blocks_and_unit_weights_give_the_report(levels):
    scores, labels = make_pairs(0, levels=levels)
    blocks = _ScoreBlocks.from_pairs(scores, labels)
    expected_blocks = blocks_by_definition(scores, labels)
    assert blocks.num_blocks == len(expected_blocks) < len(np.unique(scores))
    for index, members in enumerate(expected_blocks):
        assert blocks.genuine_sizes[index] == labels[members].sum()
        assert blocks.impostor_sizes[index] == (~labels[members]).sum()
    band = np.array([0.05, 0.2])
    values = weighted_metrics(blocks.genuine_sizes, blocks.impostor_sizes, TARGETS, band)
    report = verification_report(scores, labels, TARGETS)
    np.testing.assert_allclose(values[: -len(band)], report_values(report), rtol=1e-12, atol=0)
    band_report = verification_report(scores, labels, band)
    np.testing.assert_array_equal(values[-len(band) :], band_report.tar_at_far_threshold)


def brute_force(scores, labels, num_resamples, seed, confidence, subjects=None):
    """Each resample materialised as an array of pairs and scored by verification_report.

    Pairs: the documented multinomial counts per block, each count taken as that many copies of
    the block's first pair of the class (within a block of impostor-only scores, which ones
    does not matter: that is the claim under test). Subjects: every pair repeated as often as
    its subject was drawn."""
    rng = np.random.default_rng(seed)
    blocks = blocks_by_definition(scores, labels)
    genuine_sizes = np.array([labels[b].sum() for b in blocks])
    impostor_sizes = np.array([(~labels[b]).sum() for b in blocks])
    if subjects is not None:
        unique, inverse = np.unique(subjects, return_inverse=True)
    rows = []
    for _ in range(num_resamples):
        if subjects is None:
            genuine = rng.multinomial(labels.sum(), genuine_sizes / labels.sum())
            impostor = rng.multinomial((~labels).sum(), impostor_sizes / (~labels).sum())
            picked = []
            for block, num_g, num_i in zip(blocks, genuine, impostor, strict=True):
                if num_g:
                    picked.append(np.repeat(block[labels[block]][:1], num_g))
                if num_i:
                    picked.append(np.repeat(block[~labels[block]][:1], num_i))
            picked = np.concatenate(picked)
        else:
            draw = np.floor(rng.random(len(unique)) * len(unique)).astype(np.int64)
            drawn = np.bincount(draw, minlength=len(unique))
            picked = np.repeat(np.arange(len(scores)), drawn[inverse])
        rows.append(report_values(verification_report(scores[picked], labels[picked], TARGETS)))
    q = [50 * (1 - confidence), 50 * (1 + confidence)]
    return np.percentile(np.array(rows), q, axis=0)


@pytest.mark.parametrize("levels", [None, 3])
@pytest.mark.parametrize("by_subject", [False, True])
def test_bootstrap_equals_materialised_resamples(levels, by_subject):
    scores, labels = make_pairs(1, levels=levels)
    subjects = np.random.default_rng(2).integers(0, 40, len(scores)) if by_subject else None
    intervals = bootstrap_verification(scores, labels, TARGETS, 60, 3, 0.9, subjects)
    low, high = brute_force(scores, labels, 60, 3, 0.9, subjects)
    ours_low = np.r_[intervals.auc[0], intervals.eer[0], intervals.tar_at_far_threshold[0]]
    ours_high = np.r_[intervals.auc[1], intervals.eer[1], intervals.tar_at_far_threshold[1]]
    np.testing.assert_allclose(ours_low, low, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ours_high, high, rtol=1e-12, atol=1e-15)
    assert intervals.unit.startswith("subjects" if by_subject else "pairs")
    assert intervals.band_tar[0].shape == (BAND_POINTS,)
    assert (intervals.band_tar[0] <= intervals.band_tar[1]).all()


def test_report_option_and_dict():
    scores, labels = make_pairs(4, num_pairs=2000)
    report = verification_report(scores, labels, TARGETS, bootstrap=200, seed=7)
    again = verification_report(scores, labels, TARGETS, bootstrap=200, seed=7)
    assert report.intervals.as_dict() == again.intervals.as_dict()
    assert report.intervals.auc[0] < report.auc < report.intervals.auc[1]
    assert report.intervals.eer[0] < report.eer < report.intervals.eer[1]
    summary = json.loads(json.dumps(report.as_dict()))
    assert summary["intervals"]["num_resamples"] == 200
    assert verification_report(scores, labels, TARGETS).intervals is None


def test_subjects_resampling_widens_intervals_of_clustered_scores():
    # The genuine pairs of one subject share an offset (some people are harder to verify):
    # resampling pairs treats them as independent and understates the spread.
    rng = np.random.default_rng(5)
    subjects = np.repeat(np.arange(30), 40)
    labels = rng.random(len(subjects)) < 0.5
    scores = rng.normal(size=len(subjects)) + labels * (1 + rng.normal(size=30)[subjects])
    by_pairs = verification_report(scores, labels, TARGETS, bootstrap=300)
    by_subjects = verification_report(scores, labels, TARGETS, bootstrap=300, subjects=subjects)
    width = lambda interval: interval[1] - interval[0]  # noqa: E731
    assert width(by_subjects.intervals.auc) > 1.5 * width(by_pairs.intervals.auc)


def test_bad_bootstrap_input():
    scores, labels = make_pairs(6, num_pairs=50)
    with pytest.raises(ValueError, match="bootstrap"):
        verification_report(scores, labels, bootstrap=0)
    with pytest.raises(ValueError, match="confidence"):
        verification_report(scores, labels, bootstrap=10, confidence=1.5)
    with pytest.raises(ValueError, match="subjects has 3 entries"):
        verification_report(scores, labels, bootstrap=10, subjects=[1, 2, 3])
    with pytest.raises(ValueError, match="only used by the bootstrap"):
        verification_report(scores, labels, subjects=np.zeros(50, int))
    # One subject holding every genuine pair: most resamples have none, some keep it.
    subjects = np.where(labels, 0, np.arange(50) + 1)
    report = verification_report(scores, labels, bootstrap=50, subjects=subjects)
    assert report.intervals.num_degenerate > 0
    # Two subjects, one per class: a resample drawing the same one twice has a single class.
    seed = next(
        s for s in range(100) if len(set((np.random.default_rng(s).random(2) * 2).astype(int))) == 1
    )
    with pytest.raises(ValueError, match="every subject resample"):
        verification_report(scores, labels, bootstrap=1, subjects=np.where(labels, 0, 1), seed=seed)


def test_interval_summary_keys():
    scores, labels = make_pairs(5, num_pairs=500)
    intervals = verification_report(scores, labels, TARGETS, bootstrap=20, seed=1).intervals
    summary = intervals.as_dict()
    assert list(summary)[:7] == [
        "method", "confidence", "num_resamples", "seed", "num_degenerate", "auc", "eer",
    ]  # fmt: skip
    assert summary["eer"] == list(intervals.eer) and summary["auc"] == list(intervals.auc)
