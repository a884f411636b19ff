"""The ``pml-lm`` shell: interrupts, ``--device``, output paths checked first, options that do not
apply, TARs that cannot be measured, the environment record, and a shadowed ``evaluation``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pml_largest_margin.cli import INTERRUPTED_STATUS, eval_reid, main
from pml_largest_margin.cli.environment import environment_record

ROOT = Path(__file__).resolve().parents[1]


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"pml-lm {command}: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def reid_file(tmp_path):
    rng = np.random.default_rng(0)
    q_pids, g_pids = rng.integers(0, 4, 10), rng.integers(0, 4, 30)
    arrays = {
        "query_features": rng.normal(size=(10, 4)).astype(np.float32),
        "gallery_features": rng.normal(size=(30, 4)).astype(np.float32),
        "query_pids": q_pids,
        "gallery_pids": g_pids,
        "query_camids": np.zeros(10, dtype=np.int64),
        "gallery_camids": np.ones(30, dtype=np.int64),
    }
    np.savez(tmp_path / "features.npz", **arrays)
    ids = {key: arrays[key] for key in eval_reid.ID_KEYS}
    np.savez(tmp_path / "distmat.npz", distmat=rng.random((10, 30)), **ids)
    return tmp_path / "features.npz", tmp_path / "distmat.npz", arrays


@pytest.fixture
def scores_file(tmp_path):
    # 983 impostor pairs: FAR 1e-6 and 1e-4 are below 1/983, FAR 1e-2 is not.
    rng = np.random.default_rng(3)
    labels = np.r_[np.ones(217), np.zeros(983)].astype(bool)
    scores = rng.normal(size=labels.size) + 1.5 * labels
    np.savez(tmp_path / "scores.npz", scores=scores, labels=labels)
    return tmp_path / "scores.npz"


def test_ctrl_c_ends_in_one_line_and_status_130(monkeypatch, reid_file, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_reid, "run", interrupted)
    assert main(["eval-reid", str(reid_file[0])]) == INTERRUPTED_STATUS == 130
    captured = capsys.readouterr()
    assert captured.err == "pml-lm eval-reid: interrupted\n" and captured.out == ""


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("tpu", "--device 'tpu' is not a device"),
        ("cuda", "--device cuda: CUDA is not available on this machine"),
        ("cuda:7", "--device cuda:7: CUDA is not available on this machine"),
    ],
)
def test_device_errors_are_one_line(monkeypatch, reid_file, capsys, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["eval-reid", str(reid_file[0]), "--device", device]) == 2
    assert message in _one_error_line(capsys, "eval-reid")


def test_output_paths_are_checked_before_the_work(reid_file, scores_file, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for argv, command in [
        (["eval-reid", str(reid_file[0]), "--json", str(blocker / "m.json")], "eval-reid"),
        (["eval-reid", str(reid_file[0]), "--plot", str(tmp_path)], "eval-reid"),
        (
            ["eval-verify", str(scores_file), "--plot", str(blocker / "sub" / "r.png")],
            "eval-verify",
        ),
        (["eval-verify", str(scores_file), "--json", str(tmp_path)], "eval-verify"),
        (["demo", "--output-dir", str(blocker / "out")], "demo"),
        (["prototypes", "3", "4", "-o", str(blocker / "w.npy")], "prototypes"),
    ]:
        assert main(argv) == 2
        captured = capsys.readouterr()
        # Nothing was computed: no table came before the error.
        assert captured.out == "" and captured.err.count("\n") == 1, argv
        assert captured.err.startswith(f"pml-lm {command}: error: ")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_parent_is_refused_at_once(reid_file, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["eval-reid", str(reid_file[0]), "--json", str(locked / "m.json")]) == 2
        assert "is not writable" in _one_error_line(capsys, "eval-reid")
    finally:
        locked.chmod(0o700)


def test_a_failed_demo_leaves_no_folder_it_created(monkeypatch, tmp_path, capsys):
    import pml_largest_margin.demo.run as demo_run

    def failing(*args, **kwargs):
        raise ValueError("the training diverged")

    monkeypatch.setattr(demo_run, "run_all", failing)
    output = tmp_path / "new" / "nested"
    assert main(["demo", "--no-plots", "--output-dir", str(output)]) == 2
    assert "the training diverged" in _one_error_line(capsys, "demo")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--metric", "euclidean"], "--metric need features"),
        (["--device", "cpu"], "--device need features"),
        (["--rerank"], "--rerank need features"),
    ],
)
def test_eval_reid_options_a_distance_matrix_ignores(reid_file, capsys, extra, message):
    assert main(["eval-reid", str(reid_file[1]), *extra]) == 2
    assert message in _one_error_line(capsys, "eval-reid")


def test_eval_reid_seed_without_sampling_is_refused(reid_file, capsys):
    assert main(["eval-reid", str(reid_file[0]), "--seed", "3"]) == 2
    assert "--seed applies to" in _one_error_line(capsys, "eval-reid")


def test_eval_reid_defaults_to_cosine(reid_file, tmp_path):
    from evaluation.reid import evaluate_reid

    path, _, arrays = reid_file
    assert main(["eval-reid", str(path), "--json", str(tmp_path / "m.json")]) == 0
    saved = json.loads((tmp_path / "m.json").read_text())
    ids = [arrays[key] for key in eval_reid.ID_KEYS]
    features = (arrays["query_features"], arrays["gallery_features"])
    cosine = evaluate_reid(*features, *ids, metric="cosine", device="cpu")
    euclidean = evaluate_reid(*features, *ids, metric="euclidean", device="cpu")
    assert cosine.mAP != euclidean.mAP  # the data tell the two apart
    assert saved["metric"] == "cosine" and saved["mAP"] == pytest.approx(cosine.mAP)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--pairs", "pairs.txt"], "--pairs is not used"),
        (["--folds", "5"], "--folds applies to interleaved"),
        (["--seed", "1"], "--seed applies to --bootstrap only"),
        (["--distractor-plot", "d.png"], "--distractor-plot needs --distractors"),
    ],
)
def test_eval_verify_options_a_score_file_ignores(scores_file, capsys, extra, message):
    pairs = scores_file.parent / "pairs.txt"
    pairs.write_text("0 1 1\n")
    extra = [str(scores_file.parent / word) if "." in word else word for word in extra]
    assert main(["eval-verify", str(scores_file), *extra]) == 2
    assert message in _one_error_line(capsys, "eval-verify")


def test_tar_below_the_smallest_measurable_far_is_not_measurable(scores_file, tmp_path, capsys):
    from evaluation.verification import verification_report

    out = tmp_path / "m.json"
    argv = ["eval-verify", str(scores_file), "--far", "1e-6", "1e-4", "1e-2", "--json", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| 1e-06 | not measurable | not measurable |" in table
    assert "| 0.0001 | not measurable | not measurable |" in table
    assert "smallest measurable FAR: 1/983" in table
    saved = json.loads(out.read_text())
    rows = {row["far"]: row for row in saved["tar_at_far"]}
    assert rows[1e-6]["measurable"] is False and rows[1e-6]["nearest"] is None
    assert "1/983" in rows[1e-6]["reason"]
    report = verification_report(np.load(scores_file)["scores"], np.load(scores_file)["labels"])
    assert rows[1e-2]["measurable"] is True
    expected = dict(zip(report.far_targets, report.tar_at_far_nearest, strict=True))[1e-2]
    assert rows[1e-2]["nearest"] == pytest.approx(expected)
    # One number format: rates in percent in the table, fractions in the JSON.
    assert f"| AUC | {100 * report.auc:.3f} |" in table and saved["auc"] == report.auc
    assert f"| 0.01 | {100 * expected:.3f} |" in table


def test_every_json_carries_the_environment(reid_file, scores_file, tmp_path):
    expected = environment_record("cpu")
    reid_argv = ["eval-reid", str(reid_file[0]), "--device", "cpu", "--json", str(tmp_path / "r")]
    assert main(reid_argv) == 0
    assert main(["eval-verify", str(scores_file), "--json", str(tmp_path / "v")]) == 0
    for name in ("r", "v"):
        record = json.loads((tmp_path / name).read_text())["environment"]
        assert record == expected
    assert torch.__version__.startswith(expected["torch"])  # the build tag (+cpu) may differ
    assert expected["numpy"] == np.__version__
    assert expected["faiss"] is not None and expected["cpu"] and expected["device"] == "cpu"


def _run_python(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run(
        [sys.executable, *arguments], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_a_shadowing_evaluation_folder_is_named_in_one_line(tmp_path):
    fake = tmp_path / "evaluation"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    library = _run_python(["-c", "import pml_largest_margin"], tmp_path)
    command = _run_python(["-m", "pml_largest_margin.cli", "prototypes", "--help"], tmp_path)
    for finished in (library, command):
        assert finished.returncode == 0
        lines = finished.stderr.splitlines()
        assert len(lines) == 1, finished.stderr
        assert str(fake) in lines[0] and "EvaluationShadowedWarning" in lines[0]
        assert "run from another directory" in lines[0]
    clean = _run_python(["-m", "pml_largest_margin.cli", "prototypes", "--help"], ROOT)
    assert clean.returncode == 0 and clean.stderr == ""


@pytest.mark.parametrize(
    ("value", "text"),
    [(1e-6, "1e-6"), (1e-1, "1e-1"), (2.5e-3, "2.5e-3"), (1.0, "1"), (50.0, "50"), (0.0, "0")],
)
def test_short_number_reads_back_exactly(value, text):
    from pml_largest_margin.cli.tables import short_number

    assert short_number(value) == text
    assert float(short_number(value)) == value
    third = short_number(1 / 3)
    assert float(third) == 1 / 3 and third.endswith("e-1")
