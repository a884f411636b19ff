"""``pml-lm embed``: train → embed → eval-reid / eval-verify end to end, the keys, the errors."""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest

from pml_largest_margin.cli import main
from pml_largest_margin.cli.eval_reid import ID_KEYS
from pml_largest_margin.training.embed_job import pairs_of

Image = pytest.importorskip("PIL.Image")

TRAIN = ["--batch-size", "16", "--image-size", "16x8", "--workers", "0", "--embedding-size", "16"]
TRAIN += ["--device", "cpu", "--eval-every", "0"]
# Eight identities, each a colour: one of the 2³ corners of the RGB cube.
COLOURS = list(itertools.product((30, 220), repeat=3))


def _person(rng, pid: int):
    pixels = rng.integers(0, 40, (16, 8, 3)) + np.array(COLOURS[pid % 8])
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


@pytest.fixture
def market(tmp_path):
    """8 identities (1..8): 4 training images each over two cameras, one query from camera 1
    and two gallery images from camera 2, plus a distractor (pid 0) and a junk image (-1)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "market"
    pids = range(1, 9)
    layout = {
        "bounding_box_train": [(pid, cam) for pid in pids for cam in (1, 2, 1, 2)],
        "query": [(pid, 1) for pid in pids],
        "bounding_box_test": [(pid, 2) for pid in pids for _ in range(2)] + [(0, 1), (-1, 2)],
    }
    for folder, items in layout.items():
        (root / folder).mkdir(parents=True)
        for index, (pid, cam) in enumerate(items):
            _person(rng, pid).save(root / folder / f"{pid:04d}_c{cam}s1_{index:06d}_00.jpg")
    return root


def test_train_embed_eval_reid_end_to_end(market, tmp_path, capsys):
    started = time.perf_counter()
    run = tmp_path / "run"
    assert main(["train", str(market), "--output-dir", str(run), "--epochs", "3", *TRAIN]) == 0
    features = tmp_path / "features.npz"
    embed = ["embed", str(run / "best.pt"), str(market), "-o", str(features)]
    assert main([*embed, "--device", "cpu", "--batch-size", "5"]) == 0
    results = tmp_path / "reid.json"
    assert main(["eval-reid", str(features), "--json", str(results), "--metric", "cosine"]) == 0
    seconds = time.perf_counter() - started
    capsys.readouterr()

    with np.load(features) as arrays:
        assert set(ID_KEYS) | {"query_features", "gallery_features"} <= set(arrays.files)
        assert arrays["query_features"].shape == (8, 16)
        assert arrays["gallery_features"].shape == (17, 16)  # the junk image is dropped
        np.testing.assert_allclose(np.linalg.norm(arrays["gallery_features"], axis=1), 1, 1e-5)
        assert sorted(arrays["query_pids"]) == list(range(1, 9))
    # The chain reproduces the evaluation training ran on the same model (best = last here).
    trained = json.loads((run / "metrics.json").read_text())["metrics"]
    evaluated = json.loads(results.read_text())
    assert evaluated["mAP"] == pytest.approx(trained["mAP"], abs=1e-6)
    assert evaluated["num_valid_queries"] == 8
    assert seconds < 60, f"train → embed → eval-reid took {seconds:.1f} s"


def test_image_folder_embeddings_for_eval_verify(tmp_path, capsys):
    rng = np.random.default_rng(2)
    root = tmp_path / "faces"
    for label in range(4):
        (root / f"person_{label}").mkdir(parents=True)
        for index in range(5):
            _person(rng, label).save(root / f"person_{label}" / f"{index}.png")
    run = tmp_path / "run"
    options = ["--epochs", "1", "--batch-size", "8", "--image-size", "16", "--workers", "0"]
    assert main(["train", str(root), "--output-dir", str(run), *options, "--device", "cpu"]) == 0
    features = tmp_path / "deep" / "faces.npz"
    assert main(["embed", str(run / "last.pt"), str(root), "-o", str(features), "--raw"]) == 0
    assert "20 images of 4 classes, 190 pairs" in capsys.readouterr().out
    with np.load(features) as arrays:
        pairs, labels, classes = arrays["pairs"], arrays["labels"], arrays["image_labels"]
        assert arrays["embeddings"].shape == (20, 128)
        assert len(pairs) == 190 and labels.sum() == 4 * 10  # C(5, 2) genuine pairs per person
        np.testing.assert_array_equal(labels, classes[pairs[:, 0]] == classes[pairs[:, 1]])
    assert main(["eval-verify", str(features)]) == 0
    assert "40 genuine, 150 impostor" in capsys.readouterr().out


def test_pairs_are_all_pairs_or_a_uniform_sample():
    every, sampled = pairs_of(30, 10**6)
    assert not sampled and len(every) == 435
    assert np.all(every[:, 0] < every[:, 1])
    some, sampled = pairs_of(30, 100, seed=1)
    assert sampled and len(some) == 100 and len(np.unique(some, axis=0)) == 100
    assert np.all(some[:, 0] < some[:, 1]) and some.max() < 30
    # Each sampled pair is one of the full list, whose row-major rank the sample inverts.
    ranks = {tuple(pair): rank for rank, pair in enumerate(every)}
    assert all(tuple(pair) in ranks for pair in some)
    large, _ = pairs_of(200_000, 5, seed=0)
    assert np.all((0 <= large) & (large < 200_000)) and np.all(large[:, 0] < large[:, 1])


def _error(arguments, capsys) -> str:
    status = main(arguments)
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_embed_errors_come_before_the_work(tmp_path, capsys):
    (tmp_path / "taken.npz").write_bytes(b"")
    (tmp_path / "not_a_checkpoint.pt").write_bytes(b"junk")
    data = str(tmp_path)
    checkpoint = str(tmp_path / "missing.pt")
    assert "exists; pass --overwrite" in _error(
        ["embed", checkpoint, data, "-o", str(tmp_path / "taken.npz")], capsys
    )
    assert "must end in .npz" in _error(
        ["embed", checkpoint, data, "-o", str(tmp_path / "f.npy")], capsys
    )
    assert "no checkpoint at" in _error(
        ["embed", checkpoint, data, "-o", str(tmp_path / "f.npz")], capsys
    )
    line = _error(
        ["embed", str(tmp_path / "not_a_checkpoint.pt"), data, "-o", str(tmp_path / "f.npz")],
        capsys,
    )
    assert "cannot read checkpoint" in line
    assert not (tmp_path / "f.npz").exists()
