"""``pml-lm demo --quick`` end to end: JSON, table, figures, and the LM-Softmax margins result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pml_largest_margin.cli import main
from pml_largest_margin.demo.methods import ALL_METHODS

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]


# The piped output of the quick demo (progress and table), bytes.
PIPED_OUTPUT_LIMIT = 50_000


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``pml-lm demo --quick`` as a user runs it, its output piped to a file."""
    output_dir = tmp_path_factory.mktemp("demo") / "out"
    log = output_dir.parent / "output.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "pml_largest_margin.cli", "demo", "--quick"]
    with open(log, "wb") as handle:
        finished = subprocess.run(
            [*command, "--output-dir", str(output_dir)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=1200,
        )
    assert finished.returncode == 0, log.read_text()[-2000:]
    return output_dir, json.loads((output_dir / "results.json").read_text()), log.read_bytes()


def test_piped_output_is_short_plain_lines(quick_run):
    output_dir, results, output = quick_run
    assert len(output) < PIPED_OUTPUT_LIMIT
    assert b"\r" not in output  # no progress-bar redraws
    text = output.decode()
    runs = len(results["methods"]) * len(results["config"]["seeds"])
    assert text.count("\n[") + text.startswith("[") == runs  # one "[k/n] ..." line per run
    assert f"[{runs}/{runs}] LM-Softmax + ZC LT100, seed 1: accuracy" in text
    assert "| LM-Softmax + ZC LT100 |" in text


def test_json_has_every_method_with_every_metric(quick_run):
    _, results, _ = quick_run
    assert results["config"]["quick"] is True
    assert len(results["config"]["seeds"]) >= 2
    assert [entry["method"] for entry in results["methods"]] == [m.label for m in ALL_METHODS]
    expected = {
        "accuracy",
        "class_margin_deg",
        "class_margin_bound_deg",
        "sample_margin_min",
        "sample_margin_mean",
        "sample_margin_bound",
        "mAP",
        "rank1",
        "eer",
        "tar@far=0.01",
        "tar@far=0.001",
        "tail_accuracy",
    }
    for entry in results["methods"]:
        assert expected <= set(entry["summary"])
        assert len(entry["runs"]) == len(results["config"]["seeds"])
        for stats in entry["summary"].values():
            assert set(stats) == {"mean", "std"}
        assert entry["summary"]["class_margin_bound_deg"]["mean"] == pytest.approx(96.379, abs=1e-3)
        assert entry["summary"]["sample_margin_bound"]["mean"] == pytest.approx(10 / 9)


def test_figures_are_written(quick_run):
    output_dir, _, _ = quick_run
    names = ["margins.png", "prototypes.png", "roc.png"]
    names += ["training-margins-normface.png", "training-margins-lm-softmax.png"]
    for name in names:
        data = (output_dir / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5_000


def test_lm_softmax_separates_prototypes_more_than_normface(quick_run):
    # Quick mode trains 12 epochs only: the bound is not reached, but the ordering is clear-cut
    # (about 80° against 71° and mean margins 0.9 against 0.4 in the runs seen so far).
    _, results, _ = quick_run
    summary = {entry["method"]: entry["summary"] for entry in results["methods"]}
    for key in ("class_margin_deg", "sample_margin_mean"):
        assert summary["LM-Softmax"][key]["mean"] > summary["NormFace"][key]["mean"]


def test_table_is_printed(quick_run, capsys):
    output_dir, _, _ = quick_run
    assert (
        main(
            [
                "demo",
                "--quick",
                "--seeds",
                "1",
                "--epochs",
                "1",
                "--no-plots",
                "--output-dir",
                str(output_dir / "again"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| method |" in out and "| LM-Softmax + R_sm |" in out and "96.38°" in out


@pytest.mark.parametrize(
    "arguments, message",
    [(["--seeds", "0"], "--seeds must be at least 1"), (["--epochs", "-1"], "--epochs")],
)
def test_bad_options_give_one_line(arguments, message, tmp_path, capsys):
    assert main(["demo", *arguments, "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_output_dir_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("x")
    assert main(["demo", "--quick", "--output-dir", str(path)]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_every_json_key_is_documented(quick_run):
    _, results, _ = quick_run
    documented = (Path(__file__).parents[1] / "docs" / "demo.md").read_text()
    entry = results["methods"][0]
    keys = [*results["config"], *entry, *entry["runs"][0]]
    assert [key for key in keys if f"`{key}`" not in documented] == []
