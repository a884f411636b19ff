"""``pml-lm prototypes``, ``pml-lm train --fixed-prototypes`` and ``--recipe``, end to end."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from pml_largest_margin.cli import build_parser, main
from pml_largest_margin.cli.train import _options
from pml_largest_margin.margins import class_margin
from pml_largest_margin.training.recipes import PACKAGE_RECIPE, PAPER_RECIPE
from pml_largest_margin.training.trainer import Schedule, build_trainer

Image = pytest.importorskip("PIL.Image")

FAST = ["--epochs", "2", "--batch-size", "8", "--image-size", "16", "--workers", "0"]
FAST += ["--embedding-size", "16", "--device", "cpu"]


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for label in range(3):
        (root / f"class_{label}").mkdir(parents=True)
        for index in range(8):
            pixels = rng.integers(0, 60, (12, 12, 3))
            pixels[..., label] += 150
            Image.fromarray(pixels.astype(np.uint8)).save(root / f"class_{label}" / f"{index}.png")
    return root


def _error(arguments, capsys) -> str:
    status = main(arguments)
    err = capsys.readouterr().err
    assert status == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_simplex_prototypes_are_written(tmp_path, capsys):
    path = tmp_path / "deep" / "W.npy"
    assert main(["prototypes", "10", "32", "-o", str(path)]) == 0
    out = capsys.readouterr().out
    W = np.load(path)
    assert W.shape == (32, 10) and W.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(W, axis=0), 1, atol=1e-6)
    bound = math.degrees(math.acos(-1 / 9))
    assert class_margin(torch.from_numpy(W).double()).degrees == pytest.approx(bound, abs=1e-4)
    assert "regular simplex" in out and f"class margin {bound:.4f}° (bound {bound:.4f}°)" in out


def test_optimised_prototypes_print_the_angle_they_reach(tmp_path, capsys):
    path = tmp_path / "W.weights"  # any suffix: the file is written where asked
    assert main(["prototypes", "6", "2", "-o", str(path), "--steps", "300"]) == 0
    out = capsys.readouterr().out
    W = torch.from_numpy(np.load(path))
    assert W.shape == (2, 6)
    reached = class_margin(W).degrees
    assert "optimised, 300 steps" in out
    assert f"class margin {reached:.4f}° (bound 90.0000°)" in out
    assert reached == pytest.approx(60.0, abs=0.5)  # six points on a circle, 60° apart


@pytest.mark.parametrize(
    "arguments, message",
    [(["1", "4"], "NUM_CLASSES >= 2"), (["3", "0"], "EMBEDDING_SIZE >= 1")],
)
def test_prototypes_bad_sizes(tmp_path, capsys, arguments, message):
    assert message in _error(["prototypes", *arguments, "-o", str(tmp_path / "W.npy")], capsys)


def test_prototypes_output_is_a_directory(tmp_path, capsys):
    assert "is a directory" in _error(["prototypes", "3", "4", "-o", str(tmp_path)], capsys)


def test_training_against_fixed_prototypes(image_folder, tmp_path, capsys):
    prototypes = tmp_path / "W.npy"
    assert main(["prototypes", "3", "16", "-o", str(prototypes)]) == 0
    output = tmp_path / "run"
    arguments = ["train", str(image_folder), "--output-dir", str(output), *FAST]
    assert main([*arguments, "--fixed-prototypes", str(prototypes)]) == 0
    out = capsys.readouterr().out
    # W stayed the simplex: its class margin is the bound, 120° for three classes.
    metrics = json.loads((output / "metrics.json").read_text())["metrics"]
    assert metrics["class_margin_deg"] == pytest.approx(120.0, abs=1e-4)
    saved = torch.load(output / "last.pt", weights_only=True)["loss"]["W"]
    np.testing.assert_allclose(saved.numpy(), np.load(prototypes), atol=1e-6)
    # The monitor printed one line per epoch and wrote its files.
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("epoch ")] == [
        "epoch 1/2",
        "epoch 2/2",
    ]
    rows = list(csv.DictReader((output / "margins.csv").open()))
    assert [float(row["class_margin_degrees"]) for row in rows] == pytest.approx([120.0] * 2)
    assert json.loads((output / "margins.json").read_text())["num_classes"] == 3


def _save(path, array) -> str:
    with open(path, "wb") as handle:
        np.save(handle, array)
    return str(path)


@pytest.mark.parametrize(
    "content, message",
    [
        (np.ones((16, 4), np.float32), "has shape (16, 4) but training needs"),
        (np.ones((3, 16), np.float32), "looks transposed"),
        (np.ones((16, 3), np.int64), "2-D float array"),
        (np.ones(16, np.float32), "2-D float array"),
        (np.full((16, 3), np.nan, np.float32), "NaN or Inf"),
        (np.concatenate([np.ones((16, 2)), np.zeros((16, 1))], axis=1), "zero columns"),
    ],
)
def test_fixed_prototypes_bad_files(image_folder, tmp_path, capsys, content, message):
    path = _save(tmp_path / "W.npy", content)
    arguments = ["train", str(image_folder), "--output-dir", str(tmp_path / "run"), *FAST]
    assert message in _error([*arguments, "--fixed-prototypes", path], capsys)


@pytest.mark.parametrize("kind", ["missing", "text", "pickled"])
def test_fixed_prototypes_unreadable_files(image_folder, tmp_path, capsys, kind):
    path = tmp_path / "W.npy"
    if kind == "text":
        path.write_text("not numpy")
    elif kind == "pickled":
        np.save(path, np.array([{"W": 1}], dtype=object), allow_pickle=True)
    arguments = ["train", str(image_folder), "--output-dir", str(tmp_path / "run"), *FAST]
    line = _error([*arguments, "--fixed-prototypes", str(path)], capsys)
    assert "cannot read prototypes file" in line


def _parsed(*options: str):
    return _options(build_parser().parse_args(["train", "data", *options]))


def test_recipes_fill_in_what_is_left_out():
    package = _parsed("--loss", "cosface")
    assert package.scale == PACKAGE_RECIPE.scale == 10.0
    assert package.margin is None  # the loss's own default, 0.35
    assert package.schedule == Schedule(epochs=10, batch_size=32, lr=0.05)
    paper = _parsed("--loss", "arcface", "--recipe", "paper")
    assert (paper.scale, paper.margin) == (5.0, 0.1)  # radians, as the library takes them
    assert (paper.zero_centroid_weight, paper.zero_centroid_form) == (5.0, "sum")
    assert paper.schedule == PAPER_RECIPE.schedule
    assert paper.schedule.gradient_clip_norm == 5.0 and paper.schedule.weight_decay == 1e-4
    assert _parsed("--loss", "cosface", "--recipe", "paper").margin == 0.1
    given = _parsed("--recipe", "paper", "--scale", "7", "--epochs", "3", "--lr", "0.2")
    assert (given.scale, given.schedule.epochs, given.schedule.lr) == (7.0, 3, 0.2)
    assert given.schedule.batch_size == 256
    assert _parsed("--recipe", "paper", "--zero-centroid-weight", "0").zero_centroid_weight == 0


def test_gradient_clipping_of_network_and_prototypes_together():
    from pml_largest_margin.losses import LargestMarginSoftmaxLoss

    model, loss = torch.nn.Linear(4, 3), LargestMarginSoftmaxLoss(5, 3)
    dataset = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.arange(8) % 5)
    schedule = Schedule(epochs=1, batch_size=4, gradient_clip_norm=5.0)
    trainer = build_trainer(model, loss, dataset, schedule, device=torch.device("cpu"))
    parameters = [*model.parameters(), *loss.parameters()]
    for parameter in parameters:
        parameter.grad = torch.full_like(parameter, 10.0)
    trainer.clip_gradients()
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters]))
    assert float(total) == pytest.approx(5.0, rel=1e-5)
    assert (
        build_trainer(model, loss, dataset, Schedule(batch_size=4), device="cpu").gradient_clippers
        is None
    )
    with pytest.raises(ValueError, match="gradient_clip_norm"):
        Schedule(gradient_clip_norm=0.0)
