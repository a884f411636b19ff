"""``pml-lm train`` as a daily tool: evaluation during training, best.pt, history, log, config
files, optimisers and schedules, resuming for more epochs, interrupts, no silent overwrites."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from pml_largest_margin.cli import build_parser, main
from pml_largest_margin.cli import train as train_cli
from pml_largest_margin.training import train_job
from pml_largest_margin.training.loss_registry import LOSSES
from pml_largest_margin.training.schedule import Schedule, lr_factor

Image = pytest.importorskip("PIL.Image")

FAST = ["--batch-size", "8", "--image-size", "16", "--workers", "0"]
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


def _train(image_folder, output, *options) -> int:
    return main(["train", str(image_folder), "--output-dir", str(output), *FAST, *options])


def _error(arguments, capsys) -> str:
    status = main(arguments)
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_evaluation_every_n_epochs_history_log_and_best(image_folder, tmp_path, capsys):
    output = tmp_path / "run"
    assert _train(image_folder, output, "--epochs", "4", "--eval-every", "2") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(
        "dataset image-folder: 3 classes, 18 training images (6–6 per class); 6 held out"
    )
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epoch_lines] == [f"epoch {k}/4" for k in (1, 2, 3, 4)]
    assert all(" loss " in line and " ETA " in line for line in epoch_lines)
    evaluated = [line for line in out.splitlines() if "evaluation after epoch" in line]
    assert [line.split(":")[0].split()[-1] for line in evaluated] == ["2", "4"]

    rows = list(csv.DictReader((output / "history.csv").open()))
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3, 4]
    assert [bool(row["accuracy"]) for row in rows] == [False, True, False, True]
    assert all(math.isfinite(float(row["loss"])) for row in rows)
    history = json.loads((output / "history.json").read_text())
    assert [row["epoch"] for row in history["epochs"]] == [1, 2, 3, 4]
    best = history["best"]
    assert best["metric"] == "accuracy" and best["epoch"] in (2, 4)
    assert best["value"] == max(history["epochs"][k]["accuracy"] for k in (1, 3))

    assert (output / "train.log").read_text().splitlines()[0] == out.splitlines()[0]
    last = torch.load(output / "last.pt", weights_only=True)
    best_state = torch.load(output / "best.pt", weights_only=True)
    assert last["epoch"] == 4 and best_state["epoch"] == best["epoch"]
    report = json.loads((output / "metrics.json").read_text())
    assert report["best"] == best
    environment = report["environment"]
    assert {"pml_largest_margin", "torch", "numpy", "faiss", "device", "cpu"} <= set(environment)
    assert environment["torch"] == torch.__version__ and environment["device"] == "cpu"


def test_best_metric_can_be_minimised_and_must_be_evaluated(image_folder, tmp_path, capsys):
    output = tmp_path / "run"
    assert _train(image_folder, output, "--epochs", "2", "--best-metric", "eer") == 0
    history = json.loads((output / "history.json").read_text())
    values = [row["eer"] for row in history["epochs"]]
    assert history["best"]["value"] == min(values)
    line = _error(
        ["train", str(image_folder), "--output-dir", str(tmp_path / "x"), "--best-metric", "cmc"],
        capsys,
    )
    assert "--best-metric 'cmc' is not evaluated" in line and "accuracy" in line
    assert not (tmp_path / "x").exists()


def test_evaluation_does_not_change_training(image_folder, tmp_path):
    assert _train(image_folder, tmp_path / "a", "--epochs", "3", "--eval-every", "1") == 0
    assert _train(image_folder, tmp_path / "b", "--epochs", "3", "--eval-every", "0") == 0
    a, b = (json.loads((tmp_path / n / "metrics.json").read_text())["metrics"] for n in "ab")
    assert a == pytest.approx(b, rel=1e-6)
    rows = json.loads((tmp_path / "b" / "history.json").read_text())["epochs"]
    assert ["accuracy" in row for row in rows] == [False, False, True]


def test_existing_output_needs_resume_or_overwrite(image_folder, tmp_path, capsys):
    output = tmp_path / "run"
    assert _train(image_folder, output, "--epochs", "1") == 0
    first = (output / "last.pt").read_bytes()
    arguments = ["train", str(image_folder), "--output-dir", str(output), *FAST, "--epochs", "1"]
    line = _error(arguments, capsys)
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert (output / "last.pt").read_bytes() == first
    (output / "notes.txt").write_text("mine")
    assert main([*arguments, "--overwrite", "--seed", "1"]) == 0
    assert (output / "last.pt").read_bytes() != first
    assert (output / "notes.txt").read_text() == "mine"
    assert "exclude each other" in _error([*arguments, "--overwrite", "--resume"], capsys)


def test_failed_run_leaves_no_folder_it_created(image_folder, tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise ValueError("the disk is full")

    monkeypatch.setattr(train_job, "run_epochs", fail)
    output = tmp_path / "new" / "run"
    line = _error(["train", str(image_folder), "--output-dir", str(output), *FAST], capsys)
    assert line.endswith("the disk is full") and not (tmp_path / "new").exists()


def test_output_dir_is_checked_before_the_work(image_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_job, "_model_and_loss", None)  # the work would fail loudly
    (tmp_path / "afile").write_text("")
    arguments = ["train", str(image_folder), "--output-dir", str(tmp_path / "afile" / "run")]
    assert "cannot write in" in _error([*arguments, *FAST], capsys)


def test_resume_extends_epochs_and_names_a_differing_setting(image_folder, tmp_path, capsys):
    output = tmp_path / "run"
    assert _train(image_folder, output, "--epochs", "2") == 0
    capsys.readouterr()
    assert _train(image_folder, output, "--epochs", "3", "--resume") == 0
    out = capsys.readouterr().out
    assert "resumed after epoch 2" in out and "epoch 3/3" in out and "epoch 1/3" not in out
    rows = json.loads((output / "history.json").read_text())["epochs"]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert torch.load(output / "last.pt", weights_only=True)["epoch"] == 3
    line = _error(
        ["train", str(image_folder), "--output-dir", str(output), *FAST, "--epochs", "2"]
        + ["--resume"],
        capsys,
    )
    assert "--epochs 2 is fewer than the 3 epochs" in line
    line = _error(
        ["train", str(image_folder), "--output-dir", str(output), *FAST, "--epochs", "3"]
        + ["--resume", "--lr", "0.2"],
        capsys,
    )
    assert "schedule.lr: 0.05 there, 0.2 now" in line


def test_interrupt_keeps_the_last_checkpoint(image_folder, tmp_path, monkeypatch, capsys):
    output = tmp_path / "run"
    saved = train_job.save_checkpoint

    def save_then_stop(path, trainer, settings, extra=None):
        saved(path, trainer, settings, extra)
        if trainer.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_job, "save_checkpoint", save_then_stop)
    arguments = train_cli._merged(
        build_parser().parse_args(
            ["train", str(image_folder), "--output-dir", str(output), *FAST, "--epochs", "4"]
        )
    )
    with pytest.raises(KeyboardInterrupt) as interrupt:
        train_cli.run(arguments)
    last = str(interrupt.value)
    assert last.startswith("interrupted in epoch 3/4:") and "holds epoch 2" in last
    assert last not in capsys.readouterr().out  # printed once, by the command line
    assert torch.load(output / "last.pt", weights_only=True)["epoch"] == 2
    assert len(json.loads((output / "history.json").read_text())["epochs"]) == 2
    assert (output / "train.log").read_text().splitlines()[-1] == last


def test_interrupt_before_any_epoch_removes_the_new_folder(
    image_folder, tmp_path, monkeypatch, capsys
):
    output = tmp_path / "run"

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_job, "run_epochs", stop)
    assert main(["train", str(image_folder), "--output-dir", str(output), *FAST]) == 130
    assert "nothing saved" in capsys.readouterr().err.splitlines()[-1]
    assert not output.exists()


def test_config_file_mirrors_the_options_and_is_written_back(image_folder, tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(
        f'data = "{image_folder}"\nloss = "cosface"\nmargin = 0.2\nbatch-size = 8\n'
        "image_size = 16\nepochs = 1\nembedding-size = 16\nworkers = 0\ndevice = 'cpu'\n"
        "optimizer = 'adamw'\nlr-schedule = 'step'\n"
    )
    output = tmp_path / "run"
    assert main(["train", "--config", str(config), "--output-dir", str(output), "--seed", "3"]) == 0
    report = json.loads((output / "metrics.json").read_text())["settings"]
    assert (report["loss"], report["margin"], report["seed"]) == ("cosface", 0.2, 3)
    assert report["schedule.optimizer"] == "adamw" and report["schedule.lr"] == 1e-3
    written = (output / "config.toml").read_text()
    assert 'loss = "cosface"' in written and "seed = 3" in written and "lr = 0.001" in written
    # The written file reproduces the run's settings.
    again = train_cli._options(
        train_cli._merged(
            build_parser().parse_args(["train", "--config", str(output / "config.toml")])
        )
    )
    assert (
        again.settings()
        == train_cli._options(
            train_cli._merged(
                build_parser().parse_args(["train", "--config", str(config), "--seed", "3"])
            )
        ).settings()
    )


@pytest.mark.parametrize(
    "content, message",
    [
        ("lerning-rate = 0.1\n", "unknown key 'lerning-rate'"),
        ("lr = 'fast'\n", "invalid float value"),
        ("loss = 'triplet'\n", "invalid choice"),
        ("epochs = [1, 2]\n", "must be a single value"),
        ("resume = true\n", "unknown key 'resume'"),
        ("lr = \n", "--config"),
    ],
)
def test_config_file_errors(image_folder, tmp_path, capsys, content, message):
    config = tmp_path / "bad.toml"
    config.write_text(content)
    line = _error(["train", str(image_folder), "--config", str(config)], capsys)
    assert message in line and line.startswith("pml-lm train: error:")


def test_yaml_config_and_missing_pyyaml(image_folder, tmp_path, capsys, monkeypatch):
    config = tmp_path / "run.yaml"
    config.write_text("loss: lm-softmax\nepochs: 1\nbatch-size: 8\nimage-size: 16\n")
    if pytest.importorskip.__module__ and "yaml" in sys.modules or _has_yaml():
        parsed = train_cli._merged(
            build_parser().parse_args(["train", str(image_folder), "--config", str(config)])
        )
        assert (parsed.epochs, parsed.batch_size, parsed.image_size) == (1, 8, "16")
    monkeypatch.setitem(sys.modules, "yaml", None)
    line = _error(["train", str(image_folder), "--config", str(config)], capsys)
    assert "needs PyYAML" in line


def _has_yaml() -> bool:
    try:
        import yaml  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize(
    "options, message",
    [
        (["--loss", "softmax", "--scale", "5"], "'softmax' has no scale option"),
        (["--loss", "adacos", "--scale", "5"], "'adacos' has no scale option"),
        (["--loss", "arcface", "--margin", "1000"], "takes a number in [0, π) (radians)"),
        (["--loss", "cosface", "--margin", "-0.1"], "out of range for loss 'cosface'"),
        (["--loss", "sphereface", "--margin", "2.5"], "an integer in [1, 20]"),
        (["--loss", "adaface", "--margin", "2"], "[0, π/2)"),
        (["--loss", "magface", "--margin", "0.3"], "has no margin option"),
        (["--warmup-epochs", "2", "--epochs", "2"], "warm-up epochs"),
        (["--eval-every", "-1"], "--eval-every"),
    ],
)
def test_options_that_do_not_apply_or_are_out_of_range(
    image_folder, tmp_path, capsys, options, message
):
    arguments = ["train", str(image_folder), "--output-dir", str(tmp_path / "run"), *FAST]
    assert message in _error([*arguments, *options], capsys)
    assert not (tmp_path / "run").exists()


def test_held_out_does_not_apply_to_a_reid_layout(tmp_path, capsys):
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        (tmp_path / "market" / folder).mkdir(parents=True)
    line = _error(["train", str(tmp_path / "market"), "--held-out", "0.3"], capsys)
    assert "--held-out applies to image folders" in line


def _parsed(*options: str):
    return train_cli._options(build_parser().parse_args(["train", "data", *options]))


def test_margins_and_scales_reach_the_losses_in_one_unit(image_folder):
    from pml_largest_margin.training.loss_factory import build_loss

    arcface = _parsed("--loss", "arcface", "--margin", "0.3")
    assert arcface.margin == 0.3
    loss = build_loss("arcface", 3, 4, scale=arcface.scale, margin=arcface.margin)
    # GM-Softmax's arcface preset: 0.3 rad in, m2 = 0.3 rad.
    assert loss.m2 == pytest.approx(0.3)
    sphere = _parsed("--loss", "sphereface", "--scale", "3")
    assert build_loss("sphereface", 3, 4, scale=sphere.scale, margin=sphere.margin).scale == 3
    assert _parsed("--loss", "sphereface").scale == 1.0
    assert _parsed("--loss", "softmax").scale is None
    assert _parsed("--loss", "cosface").scale == 10.0


def test_every_margin_default_lies_in_its_range():
    for spec in LOSSES:
        if spec.margin is not None:
            assert spec.margin.contains(spec.margin.default), spec.name


def test_defaults_come_from_the_dataclasses():
    options = _parsed()
    assert options.schedule.optimizer == Schedule.optimizer
    assert options.schedule.lr_schedule == Schedule.lr_schedule
    assert options.eval_every == train_job.TrainOptions.eval_every
    assert _parsed("--optimizer", "adam").schedule.lr == 1e-3
    assert _parsed("--optimizer", "adam", "--lr", "0.01").schedule.lr == 0.01


@pytest.mark.parametrize(
    "schedule, expected",
    [
        (Schedule(epochs=4, lr_schedule="constant"), [1.0] * 8),
        (
            Schedule(epochs=4, lr_schedule="cosine"),
            [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)],
        ),
        (Schedule(epochs=4, lr_schedule="step"), [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01]),
        (
            Schedule(epochs=4, lr_schedule="cosine", warmup_epochs=1),
            [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)],
        ),
    ],
)
def test_learning_rate_factors(schedule, expected):
    assert [lr_factor(schedule, k, 2) for k in range(8)] == pytest.approx(expected)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_optimizers(optimizer):
    from pml_largest_margin.losses import LargestMarginSoftmaxLoss
    from pml_largest_margin.training.trainer import build_trainer

    model, loss = torch.nn.Linear(4, 3), LargestMarginSoftmaxLoss(5, 3)
    dataset = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.arange(8) % 5)
    schedule = Schedule(epochs=1, batch_size=4, optimizer=optimizer, lr=0.01)
    trainer = build_trainer(model, loss, dataset, schedule, device=torch.device("cpu"))
    expected = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    assert all(type(o) is expected[optimizer] for o in trainer.optimizers.values())


def test_parsers_import_no_torch():
    code = (
        "import argparse, sys\n"
        "from pml_largest_margin.cli import train, embed\n"
        "p = argparse.ArgumentParser(); s = p.add_subparsers()\n"
        "train.add_subparser(s); embed.add_subparser(s)\n"
        "print(sorted(m for m in ('torch', 'numpy', 'pytorch_metric_learning') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_progress_bar_is_labelled_with_the_epoch(monkeypatch):
    from pml_largest_margin.training import trainer as trainer_module

    labels = []

    class Recording:
        def __init__(self, iterations, desc, leave):
            labels.append(desc)
            self.iterations = iterations

        def __iter__(self):
            return iter(self.iterations)

        def set_postfix_str(self, text, refresh):
            pass

    monkeypatch.setitem(sys.modules, "tqdm", types.SimpleNamespace(tqdm=Recording))
    fake = types.SimpleNamespace(epoch=0)

    def train(start_epoch, num_epochs):
        from pytorch_metric_learning.trainers import base_trainer

        for fake.epoch in range(start_epoch, num_epochs + 1):
            for _ in base_trainer.tqdm.tqdm(range(2)):
                pass

    fake.train = train
    trainer_module.run_epochs(fake, 2, 3, progress_bar=True)
    assert labels == ["epoch 2/3", "epoch 3/3"]


def test_torchvision_extra_keeps_the_readme_torch():
    import re
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert not [pin for pin in extras["train"] if pin.startswith("torch")]
    (torchvision,) = extras["torchvision"]
    torch_pin = re.search(r"torch==(\d+)\.(\d+)\.\d+", (root / "README.md").read_text())
    # torchvision 0.N is built against torch 2.(N − 15) and requires exactly that torch.
    assert torchvision == f"torchvision==0.{int(torch_pin.group(2)) + 15}.*"
