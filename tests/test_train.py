"""``pml-lm train`` end to end on tiny generated images, checkpoints, and the errors users hit."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from pml_largest_margin.cli import main
from pml_largest_margin.training import train_job

Image = pytest.importorskip("PIL.Image")

FAST = ["--epochs", "2", "--batch-size", "8", "--image-size", "16", "--workers", "0"]
FAST += ["--embedding-size", "16", "--device", "cpu"]


def _image(rng, label):
    pixels = rng.integers(0, 60, (12, 12, 3))
    pixels[..., label % 3] += 150
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for label in range(3):
        (root / f"class_{label}").mkdir(parents=True)
        for index in range(8):
            _image(rng, label).save(root / f"class_{label}" / f"{index}.png")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def market(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "market"
    layout = {
        "bounding_box_train": [(pid, cam) for pid in (2, 4, 6) for cam in (1, 2, 1, 2)],
        "query": [(pid, 1) for pid in (8, 10)],
        "bounding_box_test": [(pid, 2) for pid in (8, 10) for _ in range(2)] + [(0, 1), (-1, 2)],
    }
    for folder, items in layout.items():
        (root / folder).mkdir(parents=True)
        for index, (pid, cam) in enumerate(items):
            _image(rng, pid // 2).save(root / folder / f"{pid:04d}_c{cam}s1_{index:06d}_00.jpg")
    return root


def test_image_folder_end_to_end(image_folder, tmp_path, capsys):
    output = tmp_path / "run"
    assert main(["train", str(image_folder), "--output-dir", str(output), *FAST]) == 0
    report = json.loads((output / "metrics.json").read_text())
    assert report["settings"]["layout"] == "image-folder"
    assert report["settings"]["num_classes"] == 3
    metrics = report["metrics"]
    for key in ("accuracy", "class_margin_deg", "sample_margin_mean", "mAP", "rank1", "eer"):
        assert np.isfinite(metrics[key])
    assert metrics["class_margin_bound_deg"] == pytest.approx(120.0)
    assert (output / "last.pt").is_file() and (output / "best.pt").is_file()
    assert "accuracy" in capsys.readouterr().out


def test_market_layout_end_to_end(market, tmp_path):
    output = tmp_path / "run"
    arguments = ["train", str(market), "--output-dir", str(output), "--loss", "arcface", *FAST]
    assert main([*arguments, "--image-size", "16x8"]) == 0
    report = json.loads((output / "metrics.json").read_text())
    assert report["settings"]["layout"] == "market1501"
    assert report["settings"]["num_classes"] == 3
    metrics = report["metrics"]
    assert metrics["num_valid_queries"] == 2 and 0 <= metrics["mAP"] <= 1
    assert {"rank1", "rank5", "mINP"} <= set(metrics)


def test_resumed_run_repeats_the_uninterrupted_one(image_folder, tmp_path, monkeypatch):
    arguments = ["train", str(image_folder), *FAST, "--epochs", "3"]
    assert main([*arguments, "--output-dir", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())

    saved = train_job.save_checkpoint

    def save_then_stop(path, trainer, settings, extra=None):
        saved(path, trainer, settings, extra)
        if trainer.epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_job, "save_checkpoint", save_then_stop)
    assert main([*arguments, "--output-dir", str(tmp_path / "split")]) == 130
    checkpoint = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 1
    monkeypatch.setattr(train_job, "save_checkpoint", saved)
    assert main([*arguments, "--output-dir", str(tmp_path / "split"), "--resume"]) == 0
    resumed = json.loads((tmp_path / "split" / "metrics.json").read_text())
    for key, value in whole["metrics"].items():
        assert resumed["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_regularizers_and_other_losses(image_folder, tmp_path):
    arguments = ["train", str(image_folder), *FAST, "--loss", "normface"]
    arguments += ["--sample-margin-weight", "0.5", "--zero-centroid-weight", "1"]
    assert main([*arguments, "--output-dir", str(tmp_path / "run")]) == 0


def _error(arguments, capsys) -> str:
    status = main(arguments)
    err = capsys.readouterr().err
    assert status == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_missing_folder(tmp_path, capsys):
    line = _error(["train", str(tmp_path / "nope"), "--output-dir", str(tmp_path)], capsys)
    assert line.startswith("pml-lm train: error:") and "does not exist" in line


def test_empty_dataset(tmp_path, capsys):
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "b").mkdir()
    line = _error(["train", str(tmp_path / "data"), "--output-dir", str(tmp_path)], capsys)
    assert "at least two class sub-folders with images" in line


def test_unreadable_image(image_folder, tmp_path, capsys):
    (image_folder / "class_0" / "broken.png").write_bytes(b"not a png")
    line = _error(["train", str(image_folder), "--output-dir", str(tmp_path), *FAST], capsys)
    assert "cannot read image" in line and "broken.png" in line


def test_market_layout_missing_folder(market, tmp_path, capsys):
    (market / "query").rename(market / "elsewhere")
    arguments = ["train", str(market), "--layout", "market1501", "--output-dir", str(tmp_path)]
    assert "query is not a directory" in _error(arguments, capsys)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--batch-size", "100"], "fewer than the batch size"),
        (["--image-size", "2x2"], "image size"),
        (["--image-size", "100000"], "image size"),
        (["--held-out", "0"], "held-out fraction"),
        (["--epochs", "0"], "epochs"),
        (["--scale", "-1"], "scale"),
        (["--lr", "nan"], "lr > 0"),
        (["--zero-centroid-weight", "nan"], "regularizer weights"),
        (["--sample-margin-weight", "-1"], "regularizer weights"),
        (["--seed", "-1"], "--seed must be at least 0"),
        (["--loss", "normface", "--margin", "0.3"], "has no margin option"),
        (
            ["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"],
            "device",
        ),
        (["--backbone", "small-cnn", "--pretrained"], "no pretrained weights"),
    ],
)
def test_bad_options(image_folder, tmp_path, capsys, options, message):
    arguments = ["train", str(image_folder), "--output-dir", str(tmp_path / "run"), *FAST]
    assert message in _error([*arguments, *options], capsys)


def test_output_dir_that_is_a_file(image_folder, tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    arguments = ["train", str(image_folder), "--output-dir", str(tmp_path / "taken"), *FAST]
    assert "exists and is not a directory" in _error(arguments, capsys)


def test_torchvision_backbone_without_torchvision(image_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    arguments = [
        "train",
        str(image_folder),
        "--output-dir",
        str(tmp_path),
        "--backbone",
        "resnet18",
    ]
    assert ".[torchvision]" in _error(arguments, capsys)


class _BrokenTorchvisionFinder:
    """Imports ``torchvision`` the way a wheel built for another torch does: it raises."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            raise RuntimeError("operator torchvision::nms does not exist")
        return None


def test_torchvision_that_does_not_load_is_one_line(image_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenTorchvisionFinder(), *sys.meta_path])
    arguments = [
        "train",
        str(image_folder),
        "--output-dir",
        str(tmp_path),
        "--backbone",
        "resnet18",
    ]
    message = _error(arguments, capsys)
    assert "does not load beside torch" in message
    assert "operator torchvision::nms does not exist" in message
    assert not (tmp_path / "last.pt").exists()


def test_resume_needs_a_matching_checkpoint(image_folder, tmp_path, capsys):
    output = ["--output-dir", str(tmp_path / "run")]
    assert "no checkpoint" in _error(
        ["train", str(image_folder), *output, *FAST, "--resume"], capsys
    )
    assert main(["train", str(image_folder), *output, *FAST]) == 0
    capsys.readouterr()
    assert "already holds a run" in _error(["train", str(image_folder), *output, *FAST], capsys)
    line = _error(
        ["train", str(image_folder), *output, *FAST, "--loss", "cosface", "--resume"], capsys
    )
    assert "different settings (loss: 'lm-softmax' there, 'cosface' now)" in line


def test_unknown_loss_is_refused_by_the_parser(image_folder, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["train", str(image_folder), "--loss", "triplet"])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'triplet'" in err and "Traceback" not in err
