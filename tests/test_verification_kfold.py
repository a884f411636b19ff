import numpy as np
import pytest
from references import reference_ten_fold, reference_ten_fold_on_distances
from sklearn.model_selection import KFold
from sklearn.preprocessing import normalize

from evaluation.verification import fuse_flip, pair_distances, verification_accuracy_10fold
from evaluation.verification.ten_fold import fold_bounds


def _loop_protocol(unit, issame, num_folds=10, far_target=1e-3, fold_details=False):
    """The shared reference (tests/references.py) on L2-normalised embeddings, as a tuple."""
    return _summary(reference_ten_fold(unit, issame, num_folds, far_target), fold_details)


def _loop_protocol_on_distances(dist, issame, num_folds=10, far_target=1e-3, fold_details=False):
    return _summary(
        reference_ten_fold_on_distances(dist, issame, num_folds, far_target), fold_details
    )


def _summary(reference, fold_details):
    summary = (
        reference.accuracy_mean,
        reference.accuracy_std,
        reference.best_thresholds,
        reference.val_mean,
        reference.val_std,
    )
    if fold_details:
        details = (reference.fold_accuracies, reference.fold_vals)
        return summary + details + (reference.val_thresholds, reference.fold_fars)
    return summary


def _interleaved_pairs(rng, num_pairs, dim=32, noise=1.0, dtype=np.float32):
    issame = rng.integers(0, 2, num_pairs).astype(bool)
    first = rng.normal(size=(num_pairs, dim))
    second = np.where(
        issame[:, None], first + noise * rng.normal(size=first.shape), rng.normal(size=first.shape)
    )
    embeddings = np.empty((2 * num_pairs, dim))
    embeddings[0::2], embeddings[1::2] = first, second
    return embeddings.astype(dtype), issame


@pytest.mark.parametrize(
    ("num_pairs", "noise", "dtype"),
    [(600, 1.0, np.float32), (457, 0.6, np.float64), (1203, 1.5, np.float32)],
)
def test_10fold_equals_loop_implementation(num_pairs, noise, dtype):
    embeddings, issame = _interleaved_pairs(
        np.random.default_rng(num_pairs), num_pairs, noise=noise, dtype=dtype
    )
    result = verification_accuracy_10fold(embeddings, issame)
    accuracy, std, bests, val, val_std = _loop_protocol(
        normalize(embeddings.astype(np.float64)), issame
    )
    assert result.accuracy_mean == accuracy
    assert result.accuracy_std == std
    assert np.array_equal(result.best_thresholds, bests)
    assert result.val_mean == val
    assert result.val_std == val_std
    assert result.fold_accuracies.shape == (10,)


def test_flip_embeddings_are_summed_then_normalised_once():
    rng = np.random.default_rng(7)
    raw, issame = _interleaved_pairs(rng, 500)
    flipped = raw + 0.3 * rng.normal(size=raw.shape).astype(np.float32)
    result = verification_accuracy_10fold(raw, issame, flipped_embeddings=flipped)
    fused = normalize(raw.astype(np.float64) + flipped.astype(np.float64))
    accuracy, std, bests, val, _ = _loop_protocol(fused, issame)
    assert (result.accuracy_mean, result.accuracy_std, result.val_mean) == (accuracy, std, val)
    assert np.array_equal(result.best_thresholds, bests)
    assert np.array_equal(fuse_flip(raw, flipped), fused)


def test_scores_and_distances_inputs_agree_with_embeddings():
    embeddings, issame = _interleaved_pairs(np.random.default_rng(1), 300, dtype=np.float64)
    distances = pair_distances(embeddings)
    unit = normalize(embeddings)
    cosines = np.sum(unit[0::2] * unit[1::2], axis=1)
    from_embeddings = verification_accuracy_10fold(embeddings, issame)
    from_distances = verification_accuracy_10fold(distances=distances, issame=issame)
    from_scores = verification_accuracy_10fold(scores=cosines, issame=issame)
    assert from_embeddings.accuracy_mean == from_distances.accuracy_mean
    assert abs(from_scores.accuracy_mean - from_embeddings.accuracy_mean) < 0.01
    np.testing.assert_allclose(distances, 2 - 2 * cosines, atol=1e-12)


@pytest.mark.parametrize("num_items", [10, 23, 6000, 6007])
def test_folds_cut_like_sklearn_kfold(num_items):
    bounds = fold_bounds(num_items, 10)
    for fold, (_, test) in enumerate(KFold(10, shuffle=False).split(np.arange(num_items))):
        assert np.array_equal(np.arange(bounds[fold], bounds[fold + 1]), test)


def test_fuse_flip_sums_then_normalises():
    rng = np.random.default_rng(2)
    raw, flipped = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    fused = fuse_flip(raw, flipped)
    expected = (raw + flipped) / np.linalg.norm(raw + flipped, axis=1, keepdims=True)
    np.testing.assert_allclose(fused, expected, rtol=1e-12)
    assert np.array_equal(fused, normalize(raw + flipped))
    with pytest.raises(ValueError, match="shape"):
        fuse_flip(raw, flipped[:4])


def test_single_class_folds_give_nan_val_not_a_number_made_up():
    distances = np.linspace(0, 3, 40)
    issame = np.zeros(40, dtype=bool)
    issame[:20] = True  # folds 0-4 all genuine, folds 5-9 all impostor
    result = verification_accuracy_10fold(distances=distances, issame=issame)
    assert np.isnan(result.fold_vals[5:]).all() and np.isnan(result.fold_fars[:5]).all()
    assert 0 <= result.accuracy_mean <= 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"embeddings": np.ones((5, 4)), "issame": [1, 0]}, "even"),
        ({"embeddings": np.full((4, 4), np.nan), "issame": [1, 0]}, "NaN"),
        ({"distances": np.ones(20), "issame": np.ones(19)}, "entries"),
        ({"distances": np.ones(20), "issame": np.full(20, 2)}, "binary"),
        ({"distances": np.ones(5), "issame": np.ones(5)}, "folds"),
        ({"distances": np.ones(20), "issame": np.ones(20), "num_folds": 1}, "num_folds"),
        ({"issame": np.ones(20)}, "exactly one"),
        ({"distances": np.ones(20), "scores": np.ones(20), "issame": np.ones(20)}, "exactly one"),
        ({"distances": np.ones(20)}, "issame"),
        (
            {
                "distances": np.ones(20),
                "issame": np.ones(20),
                "flipped_embeddings": np.ones((40, 2)),
            },
            "go with",
        ),
        (
            {
                "embeddings": np.ones((4, 3)),
                "flipped_embeddings": np.ones((4, 2)),
                "issame": [1, 0],
            },
            "shape",
        ),
        ({"embeddings": np.zeros((4, 3)), "issame": [1, 0]}, "zero"),
    ],
)
def test_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        verification_accuracy_10fold(**kwargs)


def _near_grid_pairs(rng, num_pairs, dim=16):
    """Pairs whose exact distances sit on the 0.01 grid around 1.0, stored as float32 rows of
    random lengths: float32 and float64 arithmetic put them on either side of the grid point."""
    grid = rng.integers(95, 106, num_pairs) / 100
    first = normalize(rng.normal(size=(num_pairs, dim)))
    other = rng.normal(size=(num_pairs, dim))
    other = normalize(other - (other * first).sum(1)[:, None] * first)
    cos = 1 - grid / 2
    second = cos[:, None] * first + np.sqrt(1 - cos**2)[:, None] * other
    embeddings = np.empty((2 * num_pairs, dim))
    embeddings[0::2], embeddings[1::2] = first, second
    embeddings *= rng.uniform(0.5, 2, (2 * num_pairs, 1))
    issame = (grid < 1.0) ^ (rng.random(num_pairs) < 0.1)
    return embeddings.astype(np.float32), issame


def test_float32_embeddings_are_evaluated_in_float64():
    # 20 pairs, as in insightface's float64: 0.95; in float32 one pair crosses a grid point: 1.00.
    embeddings, issame = _near_grid_pairs(np.random.default_rng(0), 20)
    result = verification_accuracy_10fold(embeddings, issame)
    in_float64 = _loop_protocol(normalize(embeddings.astype(np.float64)), issame)
    in_float32 = _loop_protocol(normalize(embeddings), issame)
    assert result.accuracy_mean == in_float64[0] == 0.95
    assert np.array_equal(result.best_thresholds, in_float64[2])
    assert in_float32[0] == 1.0  # float32 moves pairs across grid points
    assert pair_distances(embeddings).dtype == np.float64
    np.testing.assert_array_equal(
        pair_distances(embeddings),
        np.sum(
            np.square(
                normalize(embeddings.astype(np.float64))[0::2]
                - normalize(embeddings.astype(np.float64))[1::2]
            ),
            1,
        ),
    )
    float32_scores = np.sum(normalize(embeddings)[0::2] * normalize(embeddings)[1::2], 1)
    from_scores = verification_accuracy_10fold(scores=float32_scores, issame=issame)
    expected = _loop_protocol_on_distances(2.0 - 2.0 * float32_scores.astype(np.float64), issame)
    assert from_scores.accuracy_mean == expected[0]


def _assert_equals_loop(result, reference):
    accuracy, std, bests, val, val_std, fold_accuracies, fold_vals, val_thresholds, fars = reference
    assert (result.accuracy_mean, result.accuracy_std) == (accuracy, std)
    np.testing.assert_array_equal(result.fold_fars, fars)
    assert np.array_equal(result.best_thresholds, bests)
    assert np.array_equal(result.fold_accuracies, fold_accuracies)
    np.testing.assert_array_equal(result.fold_vals, fold_vals)
    np.testing.assert_allclose(result.val_thresholds, val_thresholds, rtol=1e-13, atol=0)


def _two_folds(first_half, second_half):
    """Two folds of (distance, is genuine) pairs, as distances and issame arrays."""
    pairs = list(first_half) + list(second_half)
    return np.array([d for d, _ in pairs]), np.array([same for _, same in pairs])


def test_val_threshold_interpolates_from_a_non_zero_training_far():
    # 50 impostors a fold; FAR 0.05 is 2.5 impostors: between FAR 0.04 and 0.06 on the grid.
    rng = np.random.default_rng(4)
    folds = []
    for _ in range(2):
        impostors = [(d, False) for d in np.round(rng.uniform(0.3, 3.9, 50), 4)]
        genuine = [(d, True) for d in np.round(rng.uniform(0.0, 1.5, 50), 4)]
        folds.append(rng.permutation(np.array(impostors + genuine, dtype=object)).tolist())
    distances, issame = _two_folds(*folds)
    distances, issame = distances.astype(float), issame.astype(bool)
    result = verification_accuracy_10fold(
        distances=distances, issame=issame, num_folds=2, far_target=0.05
    )
    reference = _loop_protocol_on_distances(distances, issame, 2, 0.05, fold_details=True)
    _assert_equals_loop(result, reference)
    # Not a grid point: the interpolation itself is pinned.
    assert not np.isin(result.val_thresholds, np.arange(0, 4, 0.001)).any()


def test_val_threshold_at_a_far_plateau_exactly_on_the_target():
    # Per fold: 50 impostors, 2 of them close (FAR 2/50 = 0.04 == target from t = 1.101 on) and
    # the next at 2.0: the FAR stays at the target up to the grid point 2.0, the last one <= it.
    impostors = [(1.0, False), (1.1, False)] + [(2.0 + 0.01 * i, False) for i in range(48)]
    genuine = [(0.2 + 0.035 * i, True) for i in range(50)]  # some between 1.1 and 2.0
    distances, issame = _two_folds(impostors + genuine, genuine[::-1] + impostors[::-1])
    result = verification_accuracy_10fold(
        distances=distances, issame=issame.astype(bool), num_folds=2, far_target=0.04
    )
    reference = _loop_protocol_on_distances(distances, issame, 2, 0.04, fold_details=True)
    _assert_equals_loop(result, reference)
    assert result.val_thresholds.tolist() == [2.0, 2.0]


def test_val_threshold_when_the_training_far_reaches_the_target_only_at_the_last_grid_point():
    # 48 of 50 impostors a fold at 3.9995, above the last grid point 3.999: the FAR there is
    # 2/50 == 0.04, the target itself, so the threshold is that grid point (not the fallback 0).
    impostors = [(0.5, False), (3.0, False)] + [(3.9995, False)] * 48
    genuine = [(0.1 + 0.05 * i, True) for i in range(50)]
    distances, issame = _two_folds(impostors + genuine, genuine + impostors)
    result = verification_accuracy_10fold(
        distances=distances, issame=issame.astype(bool), num_folds=2, far_target=0.04
    )
    reference = _loop_protocol_on_distances(distances, issame, 2, 0.04, fold_details=True)
    _assert_equals_loop(result, reference)
    assert result.val_thresholds.tolist() == [np.arange(0, 4, 0.001)[-1]] * 2


def test_distances_exactly_on_the_grids_and_duplicate_images():
    # d = 0 (duplicate images) and distances equal to grid points: "same" is d < t, strictly.
    rng = np.random.default_rng(9)
    on_accuracy_grid = np.arange(0, 4, 0.01)[rng.integers(0, 200, 300)]
    on_val_grid = np.arange(0, 4, 0.001)[rng.integers(0, 2000, 300)]
    distances = np.concatenate([np.zeros(40), on_accuracy_grid, on_val_grid])
    issame = distances < rng.uniform(0.3, 1.6, distances.size)
    order = rng.permutation(distances.size)
    distances, issame = distances[order], issame[order]
    for far_target in (1e-3, 0.02, 0.1):
        result = verification_accuracy_10fold(
            distances=distances, issame=issame, far_target=far_target
        )
        reference = _loop_protocol_on_distances(
            distances, issame, 10, far_target, fold_details=True
        )
        _assert_equals_loop(result, reference)
    # Every pair a duplicate: no threshold of the grid calls d = 0 "same" except t > 0.
    zeros = verification_accuracy_10fold(distances=np.zeros(20), issame=np.ones(20, bool))
    assert zeros.accuracy_mean == 1.0 and zeros.best_thresholds.tolist() == [0.01] * 10


def test_a_fold_holding_every_impostor():
    distances = np.linspace(0.1, 2.0, 20)
    issame = np.ones(20, dtype=bool)
    issame[6:8] = False  # fold 3 (pairs 6, 7) holds both impostors
    result = verification_accuracy_10fold(distances=distances, issame=issame)
    with np.errstate(invalid="ignore"):  # the reference's FAR of fold 3 is 0 / 0
        reference = _loop_protocol_on_distances(distances, issame, fold_details=True)
    assert (result.accuracy_mean, result.accuracy_std) == reference[:2]
    assert np.array_equal(result.best_thresholds, reference[2])
    # Fold 3 trains on no impostor: its VAL@FAR is undefined, not a made-up threshold.
    assert np.isnan([result.fold_vals[3], result.fold_fars[3], result.val_thresholds[3]]).all()
    others = np.arange(10) != 3
    assert (
        np.isfinite(result.fold_vals[others]).all()
        and np.isfinite(result.val_thresholds[others]).all()
    )
    np.testing.assert_array_equal(result.fold_vals[others], reference[6][others])
    assert np.isnan(result.fold_fars[others]).all()  # their test folds hold no impostor


def test_ten_pairs_in_ten_folds():
    distances = np.array([0.1, 1.9, 0.3, 1.7, 0.5, 1.5, 0.7, 1.3, 0.9, 1.1])
    issame = np.array([True, False] * 5)
    result = verification_accuracy_10fold(distances=distances, issame=issame)
    reference = _loop_protocol_on_distances(distances, issame, fold_details=True)
    _assert_equals_loop(result, reference)
    assert result.fold_accuracies.shape == (10,)
    with pytest.raises(ValueError, match="9 pairs cannot be split into 10 folds"):
        verification_accuracy_10fold(distances=distances[:9], issame=issame[:9])


@pytest.mark.parametrize("far_target", [0, 0.0, 1, -1e-3, 1.5])
def test_far_target_must_lie_strictly_between_0_and_1(far_target):
    with pytest.raises(ValueError, match=r"far_target must lie in \(0, 1\)"):
        verification_accuracy_10fold(
            distances=np.linspace(0, 2, 20), issame=np.arange(20) % 2 == 0, far_target=far_target
        )


def test_no_input_is_named_in_the_error_and_the_summary_keys():
    with pytest.raises(
        ValueError, match=r"give exactly one of embeddings, scores, distances \(got none\)"
    ):
        verification_accuracy_10fold(issame=np.ones(20))
    with pytest.raises(ValueError, match=r"\(got \['scores', 'distances'\]\)"):
        verification_accuracy_10fold(scores=np.ones(20), distances=np.ones(20), issame=np.ones(20))
    rng = np.random.default_rng(8)
    result = verification_accuracy_10fold(distances=rng.random(40), issame=np.arange(40) % 2)
    summary = result.as_dict()
    assert list(summary) == [
        "accuracy_mean", "accuracy_std", "val_at_far_1e-3_mean", "val_at_far_1e-3_std",
        "far_mean", "best_thresholds",
    ]  # fmt: skip
    assert summary["best_thresholds"] == result.best_thresholds.tolist()
    assert summary["accuracy_mean"] == result.accuracy_mean
