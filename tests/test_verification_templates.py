import numpy as np
import pytest

from evaluation.verification import (
    identification_from_top_k,
    image_features,
    open_set_identification,
    template_features,
    template_pair_scores,
)
from evaluation.verification import templates as verification_templates


def _loop_templates(features, templates, medias):
    """Template pooling written out template by template, media by media."""
    result = {}
    for template in sorted(set(templates.tolist())):
        in_template = templates == template
        media_features = []
        for media in sorted(set(medias[in_template].tolist())):
            frames = features[in_template & (medias == media)]
            media_features.append(frames.mean(axis=0))
        pooled = np.sum(media_features, axis=0)
        result[template] = pooled / np.linalg.norm(pooled)
    return result


def _ijb_like(rng, num_images=300, dim=16):
    features = rng.normal(size=(num_images, dim))
    templates = rng.integers(100, 140, num_images)
    medias = rng.integers(0, 12, num_images)
    return features, templates, medias


def test_image_features_flip_detector_and_norm():
    rng = np.random.default_rng(0)
    raw, flipped, weights = rng.normal(size=(6, 4)), rng.normal(size=(6, 4)), rng.random(6)
    np.testing.assert_allclose(image_features(raw, flipped), raw + flipped)
    np.testing.assert_allclose(
        image_features(raw, flipped, weights), (raw + flipped) * weights[:, None]
    )
    unit = (raw + flipped) / np.linalg.norm(raw + flipped, axis=1, keepdims=True)
    np.testing.assert_allclose(
        image_features(raw, flipped, weights, normalize_images=True), unit * weights[:, None]
    )
    with pytest.raises(ValueError, match="detector_scores"):
        image_features(raw, flipped, weights[:5])


def test_template_features_equal_loop():
    rng = np.random.default_rng(1)
    features, templates, medias = _ijb_like(rng)
    pooled, ids = template_features(features, templates, medias)
    expected = _loop_templates(features, templates, medias)
    assert ids.tolist() == sorted(expected)
    np.testing.assert_allclose(pooled, np.stack([expected[t] for t in ids]), rtol=1e-10)


@pytest.mark.parametrize("max_entries", [1 << 26, 0])
def test_template_pair_scores_equal_loop(monkeypatch, max_entries):
    # max_entries=0 forces the row-wise path, the default the matrix-product path.
    monkeypatch.setattr(verification_templates, "MAX_MATRIX_ENTRIES", max_entries)
    rng = np.random.default_rng(2)
    pooled, ids = template_features(*_ijb_like(rng))
    first, second = rng.choice(ids, 5_000), rng.choice(ids, 5_000)
    scores = template_pair_scores(pooled, ids, first, second, block_size=777)
    row = {template: i for i, template in enumerate(ids)}
    expected = [pooled[row[a]] @ pooled[row[b]] for a, b in zip(first, second, strict=True)]
    np.testing.assert_allclose(scores, expected, atol=1e-6)


def test_template_bad_input():
    rng = np.random.default_rng(3)
    features, templates, medias = _ijb_like(rng, 20)
    with pytest.raises(ValueError, match="media_ids"):
        template_features(features, templates, medias[:-1])
    pooled, ids = template_features(features, templates, medias)
    with pytest.raises(ValueError, match="without images"):
        template_pair_scores(pooled, ids, [ids[0]], [99999])
    with pytest.raises(ValueError, match="pairs"):
        template_pair_scores(pooled, ids, ids[:2], ids[:3])
    with pytest.raises(ValueError, match="sorted"):
        template_pair_scores(pooled, ids[::-1], ids[:2], ids[:2])


def _brute_force_identification(probes, probe_ids, gallery, gallery_ids, ranks, fpirs):
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    similarity = unit(probes) @ unit(gallery).T
    order = np.argsort(-similarity, axis=1, kind="stable")
    mated = np.isin(probe_ids, gallery_ids)
    rank_rates = []
    for k in ranks:
        hits = [probe_ids[p] in gallery_ids[order[p, :k]] for p in np.flatnonzero(mated)]
        rank_rates.append(np.mean(hits))
    top = similarity.max(axis=1)
    non_mated_top = sorted(top[~mated], reverse=True)
    tpirs = []
    for fpir in fpirs:
        k = int(np.floor(fpir * len(non_mated_top)))
        threshold = non_mated_top[k] if k < len(non_mated_top) else -np.inf
        passes = [
            gallery_ids[order[p, 0]] == probe_ids[p] and top[p] > threshold
            for p in np.flatnonzero(mated)
        ]
        tpirs.append(np.mean(passes))
    return np.array(rank_rates), np.array(tpirs)


def test_open_set_identification_equals_brute_force():
    rng = np.random.default_rng(4)
    gallery = rng.normal(size=(60, 12))
    gallery_ids = np.arange(60) * 3
    mated_rows = rng.integers(0, 60, 150)
    probes = np.concatenate(
        [gallery[mated_rows] + 0.9 * rng.normal(size=(150, 12)), rng.normal(size=(80, 12))]
    )
    probe_ids = np.concatenate([gallery_ids[mated_rows], np.full(80, 1)])  # id 1: no mate
    ranks, fpirs = (1, 5, 10), (0.0, 0.05, 0.1, 0.5, 1.0)
    result = open_set_identification(
        probes, probe_ids, gallery, gallery_ids, ranks, fpirs, device="cpu"
    )
    rank_rates, tpirs = _brute_force_identification(
        probes, probe_ids, gallery, gallery_ids, ranks, fpirs
    )
    np.testing.assert_allclose(result.rank_rates, rank_rates)
    np.testing.assert_allclose(result.tpir, tpirs)
    assert (result.num_mated, result.num_non_mated) == (150, 80)
    assert result.as_dict()["rank"]["1"] == result.rank_rates[0]


def test_identification_bad_input():
    scores = np.array([[0.9, 0.1], [0.5, 0.4]])
    subjects = np.array([[1, 2], [2, 1]])
    with pytest.raises(ValueError, match="ranks"):
        identification_from_top_k(scores, subjects, [1, 3], [1, 2], ranks=(3,))
    with pytest.raises(ValueError, match="num_probes"):
        identification_from_top_k(scores, subjects[:1], [1, 3], [1, 2])
    with pytest.raises(ValueError, match="NaN"):
        identification_from_top_k(np.full((2, 2), np.nan), subjects, [1, 3], [1, 2])
    with pytest.raises(ValueError, match="gallery"):
        open_set_identification(np.ones((2, 3)), [1, 2], np.ones((2, 3)), [1, 2], ranks=(5,))


def test_identification_without_mated_probes_is_an_error():
    scores = np.array([[0.9, 0.1], [0.8, 0.2]])
    with pytest.raises(ValueError, match="no probe subject"):
        identification_from_top_k(scores, np.array([[1, 2], [2, 1]]), [5, 6], [1, 2], ranks=(1,))


def test_closed_set_identification_has_rank_rates_and_no_tpir():
    scores = np.array([[0.9, 0.1], [0.8, 0.2]])
    result = identification_from_top_k(
        scores, np.array([[1, 2], [1, 2]]), [1, 2], [1, 2], ranks=(1, 2)
    )
    np.testing.assert_array_equal(result.rank_rates, [0.5, 1.0])
    assert np.isnan(result.tpir).all() and result.num_non_mated == 0


def test_rank_rates_of_tied_gallery_templates_do_not_depend_on_the_ranks_asked():
    # Every gallery template three times (subjects 3j, 3j+1, 3j+2): exact ties at every rank.
    rng = np.random.default_rng(0)
    base = rng.normal(size=(20, 8))
    gallery, gallery_ids = np.repeat(base, 3, axis=0), np.arange(60)
    rows = rng.integers(0, 20, 50)
    probe_ids = 3 * rows + rng.integers(0, 3, 50)
    # Ties go to the lower gallery index: a probe is found at rank r + 1 for subject 3j + r.
    expected = [np.mean(probe_ids % 3 < r) for r in (1, 2, 3)]
    for ranks in [(1,), (1, 2), (2, 1, 3), (1, 3, 10)]:
        result = open_set_identification(
            base[rows], probe_ids, gallery, gallery_ids, ranks, device="cpu"
        )
        for rank, rate in zip(ranks, result.rank_rates, strict=True):
            assert rate == (expected[rank - 1] if rank <= 3 else 1.0), (ranks, rank)


def test_two_template_ids_out_of_order_are_refused():
    pooled = np.eye(2, 3)
    with pytest.raises(ValueError, match="unique_template_ids must be sorted and unique"):
        template_pair_scores(pooled, [7, 3], [3], [7])
    with pytest.raises(ValueError, match="unique_template_ids must be sorted and unique"):
        template_pair_scores(pooled, [3, 3], [3], [3])


def test_identification_summary_keys_and_the_deprecated_use_gpu():
    rng = np.random.default_rng(6)
    gallery = rng.normal(size=(8, 4))
    probes = np.concatenate(
        [gallery + 0.1 * rng.normal(size=gallery.shape), rng.normal(size=(3, 4))]
    )
    probe_ids = np.r_[np.arange(8), [100, 101, 102]]
    result = open_set_identification(probes, probe_ids, gallery, np.arange(8), (1, 2), (0.5,))
    summary = result.as_dict()
    assert list(summary) == ["num_mated", "num_non_mated", "rank", "tpir_at_fpir"]
    assert (summary["num_mated"], summary["num_non_mated"]) == (8, 3)
    assert list(summary["rank"]) == ["1", "2"]
    with pytest.warns(DeprecationWarning, match="use_gpu="):
        old = open_set_identification(
            probes, probe_ids, gallery, np.arange(8), (1, 2), (0.5,), use_gpu=False
        )
    assert old.as_dict() == summary
