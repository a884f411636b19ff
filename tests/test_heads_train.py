"""``pml-lm train --loss <head>`` end to end on tiny generated images, for every head (the
dynamic margins take the class counts of the training split, AdaFace its norm statistics over
the trainer's batches), and ``--sub-centers``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pml_largest_margin.cli import main

Image = pytest.importorskip("PIL.Image")

FAST = ["--epochs", "1", "--batch-size", "8", "--image-size", "12", "--workers", "0"]
FAST += ["--embedding-size", "8", "--device", "cpu"]
HEADS = ("adaface", "magface", "curricularface", "elasticface-arc", "elasticface-cos", "adacos",
         "adacos-fixed", "dynamic-margin")  # fmt: skip


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("heads") / "images"
    for label, count in enumerate((10, 8, 6)):  # unequal counts: distinct dynamic margins
        (root / f"class_{label}").mkdir(parents=True)
        for index in range(count):
            pixels = rng.integers(0, 60, (12, 12, 3))
            pixels[..., label] += 150
            Image.fromarray(pixels.astype(np.uint8)).save(root / f"class_{label}" / f"{index}.png")
    return root


@pytest.mark.parametrize("name", HEADS)
def test_train_runs_every_head(image_folder, tmp_path, name):
    assert (
        main(["train", str(image_folder), "--output-dir", str(tmp_path), "--loss", name, *FAST])
        == 0
    )
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["settings"]["loss"] == name
    assert 0.0 <= report["metrics"]["accuracy"] <= 1.0


def test_train_with_sub_centers(image_folder, tmp_path):
    arguments = ["train", str(image_folder), "--output-dir", str(tmp_path), "--loss", "arcface"]
    assert main([*arguments, "--sub-centers", "2", *FAST]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["settings"]["sub_centers"] == 2
    assert 0.0 <= report["metrics"]["accuracy"] <= 1.0
    assert "sub-centers = 2" in (tmp_path / "config.toml").read_text()


def test_sub_centers_refused_for_a_loss_without_them(image_folder, tmp_path, capsys):
    arguments = ["train", str(image_folder), "--output-dir", str(tmp_path), "--loss", "cosface"]
    assert main([*arguments, "--sub-centers", "2", *FAST]) != 0
    assert "has no sub-centres" in capsys.readouterr().err
