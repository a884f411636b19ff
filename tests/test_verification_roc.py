import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score, roc_curve

from evaluation.verification import RocCurve, auc, eer, roc, tar_at_far, verification_report


def _pairs(rng, n, dtype=np.float64, levels=None):
    labels = rng.integers(0, 2, n)
    labels[:2] = (0, 1)
    if levels is None:
        scores = rng.normal(size=n) + labels
    else:
        scores = rng.integers(0, levels, n) + 0.5 * labels * rng.integers(0, 2, n)
    return scores.astype(dtype), labels


def _assert_same_curve(scores, labels):
    ours = roc(scores, labels)
    reference = roc_curve(labels, scores, drop_intermediate=False)
    for mine, theirs in zip(ours, reference, strict=True):
        assert mine.dtype == theirs.dtype
        assert np.array_equal(mine, theirs)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("levels", [None, 3, 20])
def test_roc_point_set_equals_sklearn(dtype, levels):
    rng = np.random.default_rng(levels or 0)
    for n in (2, 3, 50, 2_000):
        _assert_same_curve(*_pairs(rng, n, dtype, levels))


def test_roc_float32_scores_that_differ_only_in_float32():
    rng = np.random.default_rng(5)
    base = np.float32(0.7) + np.arange(40, dtype=np.float32) * np.finfo(np.float32).eps
    scores = rng.permutation(np.repeat(base, 3))
    labels = rng.integers(0, 2, scores.shape[0])
    _assert_same_curve(scores, labels)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(-4, 4).map(lambda v: v / 4), st.booleans()), min_size=2, max_size=40
    ).filter(lambda pairs: len({label for _, label in pairs}) == 2)
)
def test_roc_auc_eer_tar_match_references_on_generated_pairs(pairs):
    scores = np.array([score for score, _ in pairs])
    labels = np.array([label for _, label in pairs])
    _assert_same_curve(scores, labels)
    assert abs(auc(scores, labels) - roc_auc_score(labels, scores)) < 1e-12
    assert abs(eer(scores, labels) - _brute_force_eer(scores, labels)) < 1e-12
    targets = np.array([0.0, 0.05, 0.2, 0.5, 1.0])
    assert np.array_equal(
        tar_at_far(scores, labels, targets), _nearest_tar(scores, labels, targets)
    )
    assert np.array_equal(
        tar_at_far(scores, labels, targets, rule="threshold"),
        _threshold_tar(scores, labels, targets),
    )


def _brute_force_eer(scores, labels):
    """Walk every ROC segment and solve FAR = 1 - TAR on the first one where they cross."""
    far, tar, _ = roc_curve(labels, scores, drop_intermediate=False)
    frr = 1.0 - tar
    for i in range(len(far)):
        if far[i] - frr[i] >= 0:
            if far[i] - frr[i] == 0:
                return far[i]
            gap_before, gap_after = far[i - 1] - frr[i - 1], far[i] - frr[i]
            share = -gap_before / (gap_after - gap_before)
            return far[i - 1] + share * (far[i] - far[i - 1])
    raise AssertionError("the ROC always ends at (1, 1)")


def _nearest_tar(scores, labels, targets):
    far, tar, _ = roc_curve(labels, scores)  # sklearn's default drop_intermediate=True
    chosen = []
    for target in targets:
        best = 0
        for i in range(len(far)):
            if abs(far[i] - target) <= abs(far[best] - target):
                best = i  # ties: the later point (larger FAR, then larger TAR)
        chosen.append(tar[best])
    return np.array(chosen)


def _threshold_tar(scores, labels, targets):
    impostor = sorted(scores[labels == 0], reverse=True)
    genuine = scores[labels == 1]
    result = []
    for target in targets:
        # k = floor(target * n) counted exactly: the most impostors whose FAR k / n is <= target.
        k = max(k for k in range(len(impostor) + 1) if k / len(impostor) <= target)
        if k >= len(impostor):
            result.append(1.0)
            continue
        threshold = impostor[k]
        result.append(sum(score > threshold for score in genuine) / len(genuine))
    return np.array(result)


@pytest.mark.parametrize("levels", [None, 4])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_metrics_match_references_on_larger_inputs(levels, dtype):
    rng = np.random.default_rng(11)
    scores, labels = _pairs(rng, 5_000, dtype, levels)
    assert abs(auc(scores, labels) - roc_auc_score(labels, scores)) < 1e-12
    assert abs(eer(scores, labels) - _brute_force_eer(scores, labels)) < 1e-12
    targets = np.array([1e-4, 1e-3, 1e-2, 0.1, 0.3])
    assert np.array_equal(
        tar_at_far(scores, labels, targets), _nearest_tar(scores, labels, targets)
    )
    assert np.array_equal(
        tar_at_far(scores, labels, targets, rule="threshold"),
        _threshold_tar(scores, labels, targets),
    )


def test_nearest_rule_ties_go_to_the_larger_far():
    # Impostors at 0.1, 0.2, 0.3, 0.4 and genuine pairs in between: FAR moves in steps of 1/4.
    scores = np.array([0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1])
    labels = np.array([1, 0, 1, 0, 1, 0, 1, 0])
    # FAR 0.125 is halfway between the points at FAR 0 and FAR 0.25: the latter wins.
    far, tar, _ = roc_curve(labels, scores)
    expected = tar[np.flatnonzero(far == 0.25)[-1]]
    assert tar_at_far(scores, labels, [0.125])[0] == expected == 0.5


def test_report_shares_one_sort_and_agrees_with_each_function():
    rng = np.random.default_rng(3)
    scores, labels = _pairs(rng, 3_000, np.float32, 50)
    targets = [1e-3, 1e-2, 1e-1]
    report = verification_report(scores, labels, targets)
    for mine, theirs in zip(
        (report.far, report.tar, report.thresholds), roc(scores, labels), strict=True
    ):
        assert np.array_equal(mine, theirs)
    assert report.auc == auc(scores, labels)
    assert report.eer == eer(scores, labels)
    assert np.array_equal(report.tar_at_far_nearest, tar_at_far(scores, labels, targets))
    assert np.array_equal(
        report.tar_at_far_threshold, tar_at_far(scores, labels, targets, rule="threshold")
    )
    summary = report.as_dict()
    assert summary["num_genuine"] + summary["num_impostor"] == 3_000


def test_accepts_torch_tensors_and_bool_labels():
    torch = pytest.importorskip("torch")
    scores = torch.tensor([0.9, 0.1, 0.8, 0.3])
    labels = torch.tensor([True, False, True, False])
    assert auc(scores, labels) == 1.0
    assert eer(scores.double(), labels) == 0.0


@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [
        ([0.1, np.nan], [0, 1], "NaN"),
        ([0.1, np.inf], [0, 1], "NaN or Inf"),
        ([0.1, 0.2, 0.3], [0, 1], "entries"),
        ([0.1, 0.2], [0, 2], "binary"),
        ([0.1, 0.2], [1, 1], "no impostor"),
        ([0.1, 0.2], [0, 0], "no genuine"),
        ([], [], "empty"),
        ([[0.1, 0.2]], [[0, 1]], "1-D"),
        (["a", "b"], [0, 1], "numeric"),
    ],
)
def test_bad_input_raises_clear_errors(scores, labels, message):
    for metric in (roc, auc, eer, tar_at_far, verification_report):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ValueError, match=message):
                metric(np.asarray(scores), np.asarray(labels))


def test_bad_far_targets_and_rule():
    scores, labels = np.array([0.2, 0.8]), np.array([0, 1])
    with pytest.raises(ValueError, match="far_targets"):
        tar_at_far(scores, labels, [1.5])
    with pytest.raises(ValueError, match="far_targets"):
        tar_at_far(scores, labels, [np.nan])
    with pytest.raises(ValueError, match="rule"):
        tar_at_far(scores, labels, [0.1], rule="closest")


@pytest.mark.parametrize(
    ("scores", "labels"),
    [([0.5, 0.5, 0.5], [0, 1, 1]), ([0.2, 0.7], [0, 1]), ([0.7, 0.2, 0.7, 0.2], [0, 1, 1, 0])],
)
def test_curves_with_one_or_two_distinct_scores(scores, labels):
    scores, labels = np.array(scores, dtype=np.float32), np.array(labels)
    _assert_same_curve(scores, labels)
    targets = np.array([0.0, 0.5, 1.0])
    assert np.array_equal(
        tar_at_far(scores, labels, targets), _nearest_tar(scores, labels, targets)
    )
    assert abs(eer(scores, labels) - _brute_force_eer(scores, labels)) < 1e-12


def test_threshold_rule_counts_the_allowed_impostors_exactly():
    # 100 impostors at 0..99 and a genuine pair just above each: at FAR 0.29, 29 impostors may
    # pass (29 / 100 == 0.29), so t = 70 and the 30 genuine pairs above it pass.
    # In floating point 0.29 * 100 == 28.999999999999996, which floors to 28 (TAR 0.29).
    scores = np.concatenate([np.arange(100.0), np.arange(100.0) + 0.5])
    labels = np.repeat([0, 1], 100)
    targets = [0.29, 0.57, 0.58, 0.07]
    expected = np.array([0.30, 0.58, 0.59, 0.08])
    assert np.array_equal(_threshold_tar(scores, labels, targets), expected)
    assert np.array_equal(tar_at_far(scores, labels, targets, rule="threshold"), expected)
    curve = RocCurve.from_scores(scores, labels)
    assert np.array_equal(tar_at_far(curve, far_targets=targets, rule="threshold"), expected)
    assert np.array_equal(
        verification_report(scores, labels, targets).tar_at_far_threshold, expected
    )
    # Just below 9/10, 10 * FAR rounds up to 9.0, but 9 impostors would be FAR 0.9 > target: 8.
    below = np.nextafter(0.9, 0)
    scores, labels = np.concatenate([np.arange(10.0), np.arange(10.0) + 0.5]), np.repeat([0, 1], 10)
    assert np.floor(below * 10) == 9 and 9 / 10 > below
    assert _threshold_tar(scores, labels, [below])[0] == 0.9
    assert tar_at_far(scores, labels, [below], rule="threshold")[0] == 0.9
    assert verification_report(scores, labels, [below]).tar_at_far_threshold[0] == 0.9


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_threshold_rule_on_distinct_scores_and_the_end_targets(dtype):
    rng = np.random.default_rng(21)
    scores, labels = _pairs(rng, 3_001, dtype)
    assert np.unique(scores).size == scores.size
    targets = np.array([0.0, 1e-3, 0.013, 0.1, 0.29, 0.5, 0.999, 1.0])
    expected = _threshold_tar(scores, labels, targets)
    report = verification_report(scores, labels, targets)
    assert np.array_equal(report.tar_at_far_threshold, expected)
    assert np.array_equal(tar_at_far(scores, labels, targets, rule="threshold"), expected)
    assert np.array_equal(report.tar_at_far_nearest, _nearest_tar(scores, labels, targets))
    assert expected[-1] == 1.0 and report.tar_at_far_nearest[-1] == 1.0
    for rule in ("nearest", "threshold"):
        assert tar_at_far(scores, labels, [1.0], rule=rule)[0] == 1.0


def test_integer_scores_above_2_to_the_53_stay_distinct():
    rng = np.random.default_rng(8)
    scores = 2**53 + rng.permutation(400).astype(np.int64)
    labels = (rng.random(400) < scores % 3 / 2).astype(int)
    labels[:2] = (0, 1)
    assert np.unique(scores.astype(np.float64)).size < 400  # float64 would merge them
    _assert_same_curve(scores, labels)
    assert roc(scores, labels)[0].size == 401
    assert auc(scores, labels) == roc_auc_score(labels, scores)
    targets = np.array([0.01, 0.1, 0.3, 0.77])
    exact = [int(value) for value in scores]  # Python ints: the reference compares exactly
    expected = _threshold_tar(np.array(exact, dtype=object), labels, targets)
    assert np.array_equal(tar_at_far(scores, labels, targets, rule="threshold"), expected)
    assert np.array_equal(
        verification_report(scores, labels, targets).tar_at_far_threshold, expected
    )
    assert np.array_equal(
        tar_at_far(scores, labels, targets), _nearest_tar(scores, labels, targets)
    )


@pytest.mark.parametrize("first", [0.0, -0.0])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_tie_of_plus_and_minus_zero_takes_sklearns_threshold_sign(first, dtype):
    rng = np.random.default_rng(0)
    scores = np.array([first, -first, 0.5, -0.5, -first, first, 0.25, -0.25] * 5, dtype=dtype)
    labels = rng.integers(0, 2, scores.size)
    labels[:2] = (0, 1)
    mine = roc(scores, labels)[2]
    theirs = roc_curve(labels, scores, drop_intermediate=False)[2]
    assert np.array_equal(mine, theirs)
    assert np.array_equal(np.signbit(mine), np.signbit(theirs))
    assert np.signbit(mine[mine == 0]).tolist() == [bool(np.signbit(first))]


def test_one_curve_serves_every_metric():
    rng = np.random.default_rng(13)
    scores, labels = _pairs(rng, 2_000, np.float32, 30)
    targets = [1e-3, 0.01, 0.29, 1.0]
    curve = RocCurve.from_scores(scores, labels)
    for mine, theirs in zip(roc(curve), roc(scores, labels), strict=True):
        assert np.array_equal(mine, theirs)
    assert auc(curve) == auc(scores, labels)
    assert eer(curve) == eer(scores, labels)
    for rule in ("nearest", "threshold"):
        assert np.array_equal(
            tar_at_far(curve, far_targets=targets, rule=rule),
            tar_at_far(scores, labels, targets, rule=rule),
        )
    from_curve, from_scores = (
        verification_report(curve, far_targets=targets),
        verification_report(scores, labels, targets),
    )
    assert from_curve.as_dict() == from_scores.as_dict()
    assert np.array_equal(from_curve.far, from_scores.far)
    with pytest.raises(ValueError, match="labels go with scores"):
        auc(curve, labels)
    for metric in (roc, auc, eer, tar_at_far, verification_report):
        with pytest.raises(
            ValueError, match=r"^labels are required with scores \(or pass a RocCurve\)$"
        ):
            metric(scores)


def _ijb_script_tar(scores, labels, targets):
    # The IJB evaluation scripts' selection: flip the ROC, then the first point closest to each target.
    far, tar, _ = roc_curve(labels, scores)
    far, tar = np.flipud(far), np.flipud(tar)
    return np.array([tar[np.argmin(np.abs(far - target))] for target in targets])


@pytest.mark.parametrize("levels", [None, 3, 6])
def test_nearest_rule_equals_the_ijb_scripts_selection_on_ties(levels):
    rng = np.random.default_rng(5)
    scores, labels = _pairs(rng, 400, np.float64, levels)
    # Targets halfway between ROC points make the tie rule decide.
    far, _, _ = roc_curve(labels, scores)
    targets = np.concatenate([(far[:-1] + far[1:]) / 2, far, [1e-3, 0.1]])
    assert np.array_equal(
        tar_at_far(scores, labels, targets), _ijb_script_tar(scores, labels, targets)
    )
