import numpy as np
import pytest
from sklearn.model_selection import KFold
from sklearn.preprocessing import normalize

from evaluation.verification import fuse_flip, pair_distances, verification_accuracy_10fold
from evaluation.verification.ten_fold import fold_bounds


def _loop_protocol(unit, issame, n_folds=10, far_target=1e-3):
    """docs/theory.md §6 written out threshold by threshold, as the reference evaluator runs it,
    on embeddings it has already L2-normalised."""
    dist = np.sum(np.square(unit[0::2] - unit[1::2]), 1).astype(np.float64)
    issame = np.asarray(issame, dtype=bool)
    thresholds, val_grid = np.arange(0, 4, 0.01), np.arange(0, 4, 0.001)
    accuracies, bests, vals = [], [], []
    for train, test in KFold(n_splits=n_folds, shuffle=False).split(np.arange(dist.size)):
        train_accuracy = [
            np.sum(np.less(dist[train], t) == issame[train]) / train.size for t in thresholds
        ]
        best = thresholds[int(np.argmax(train_accuracy))]
        bests.append(best)
        accuracies.append(np.sum(np.less(dist[test], best) == issame[test]) / test.size)
        impostors = ~issame[train]
        fars = np.array(
            [np.sum(np.less(dist[train], t) & impostors) / impostors.sum() for t in val_grid]
        )
        if fars.max() >= far_target:
            last = np.flatnonzero(fars <= far_target)[-1]
            if fars[last] == far_target or last == val_grid.size - 1:
                threshold = val_grid[last]
            else:
                slope = (val_grid[last + 1] - val_grid[last]) / (fars[last + 1] - fars[last])
                threshold = val_grid[last] + (far_target - fars[last]) * slope
        else:
            threshold = 0.0
        vals.append(np.sum(np.less(dist[test], threshold) & issame[test]) / issame[test].sum())
    return np.mean(accuracies), np.std(accuracies), np.array(bests), np.mean(vals), np.std(vals)


def _interleaved_pairs(rng, n_pairs, dim=32, noise=1.0, dtype=np.float32):
    issame = rng.integers(0, 2, n_pairs).astype(bool)
    first = rng.normal(size=(n_pairs, dim))
    second = np.where(
        issame[:, None], first + noise * rng.normal(size=first.shape), rng.normal(size=first.shape)
    )
    embeddings = np.empty((2 * n_pairs, dim))
    embeddings[0::2], embeddings[1::2] = first, second
    return embeddings.astype(dtype), issame


@pytest.mark.parametrize(
    ("n_pairs", "noise", "dtype"),
    [(600, 1.0, np.float32), (457, 0.6, np.float64), (1203, 1.5, np.float32)],
)
def test_10fold_equals_loop_implementation(n_pairs, noise, dtype):
    embeddings, issame = _interleaved_pairs(
        np.random.default_rng(n_pairs), n_pairs, noise=noise, dtype=dtype
    )
    result = verification_accuracy_10fold(embeddings, issame)
    accuracy, std, bests, val, val_std = _loop_protocol(normalize(embeddings), issame)
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
    accuracy, std, bests, val, _ = _loop_protocol(normalize(raw + flipped), issame)
    assert (result.accuracy_mean, result.accuracy_std, result.val_mean) == (accuracy, std, val)
    assert np.array_equal(result.best_thresholds, bests)
    assert np.array_equal(fuse_flip(raw, flipped), normalize(raw + flipped))


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


@pytest.mark.parametrize("n_items", [10, 23, 6000, 6007])
def test_folds_cut_like_sklearn_kfold(n_items):
    bounds = fold_bounds(n_items, 10)
    for fold, (_, test) in enumerate(KFold(10, shuffle=False).split(np.arange(n_items))):
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
        ({"distances": np.ones(20), "issame": np.ones(20), "n_folds": 1}, "n_folds"),
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
