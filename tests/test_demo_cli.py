"""``pml-lm demo`` keeps its work: runs saved as they finish, ``--resume``, ``--methods``,
``--overwrite``, Ctrl-C, ``--quiet``; and its figures say what they show."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pml_largest_margin.cli import main

ROOT = Path(__file__).resolve().parents[1]
# One epoch, one seed, no figures: each run takes well under a second.
TINY = ["demo", "--seeds", "1", "--epochs", "1", "--no-plots"]


def _demo(output_dir: Path, *extra: str) -> int:
    return main([*TINY, "--output-dir", str(output_dir), *extra])


def test_unknown_method_lists_the_valid_ones(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _demo(tmp_path / "out", "--methods", "normface", "nonsense")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nonsense'" in err and "lm-softmax+r_sm" in err
    assert not (tmp_path / "out").exists()


def test_methods_resume_and_overwrite(tmp_path, capsys):
    output = tmp_path / "out"
    assert _demo(output, "--methods", "normface") == 0
    first = output / "runs" / "normface-seed0.json"
    saved = json.loads(first.read_text())
    assert saved["run"]["method"] == "NormFace" and saved["config"]["loss"] == "normface"
    results = json.loads((output / "results.json").read_text())
    assert [entry["method"] for entry in results["methods"]] == ["NormFace"]
    capsys.readouterr()

    # A second run into the same folder neither overwrites nor mixes silently.
    assert _demo(output, "--methods", "normface") == 2
    err = capsys.readouterr().err
    assert "is not empty: add --resume" in err and err.count("\n") == 1

    stamp = first.stat().st_mtime_ns
    assert _demo(output, "--methods", "normface", "lm-softmax", "--resume") == 0
    captured = capsys.readouterr()
    assert "--resume: 1 of 2 runs already in" in captured.err
    assert first.stat().st_mtime_ns == stamp  # kept, not trained again
    results = json.loads((output / "results.json").read_text())
    assert [entry["method"] for entry in results["methods"]] == ["NormFace", "LM-Softmax"]
    assert results["config"]["resumed_runs"] == 1
    assert results["methods"][0]["runs"] == [saved["run"]["metrics"]]

    # Other settings than the saved runs': refused, naming the setting.
    assert _demo(output, "--methods", "normface", "--resume", "--epochs", "2") == 2
    err = capsys.readouterr().err
    assert "was made with schedule.epochs = 1, this command asks 2" in err and "--overwrite" in err

    assert _demo(output, "--methods", "lm-softmax", "--overwrite") == 0
    assert sorted(path.name for path in (output / "runs").iterdir()) == ["lm-softmax-seed0.json"]


def test_quiet_prints_only_the_results(tmp_path, capsys):
    assert _demo(tmp_path / "out", "--methods", "normface", "cosface", "--quiet") == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.startswith("| method |") and "| CosFace |" in captured.out


def test_plain_progress_lines_when_not_a_terminal(tmp_path, capsys):
    assert _demo(tmp_path / "out", "--methods", "normface", "cosface") == 0
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "[1/2] NormFace, seed 0",
        "[2/2] CosFace, seed 0",
    ]
    assert "ETA" in lines[0] and "elapsed" in lines[1]


def test_ctrl_c_keeps_the_finished_runs_and_resume_goes_on(tmp_path):
    output = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "pml_largest_margin.cli", *TINY, "--output-dir", str(output)]
    methods = ["--methods", "normface", "cosface", "--seeds", "3"]
    process = subprocess.Popen(
        [*command, *methods, "--epochs", "3"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    runs = output / "runs"
    deadline = time.monotonic() + 300
    while not (runs.is_dir() and list(runs.glob("*.json"))) and time.monotonic() < deadline:
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("the demo finished before the interrupt")  # a very fast machine
    kept = sorted(path.name for path in runs.glob("*.json"))
    assert process.returncode == 130
    last = err.strip().splitlines()[-1]
    assert last.startswith("pml-lm demo: interrupted;") and "--resume" in last
    assert "Traceback" not in err
    assert kept and not list(runs.glob("*.partial"))
    resumed = subprocess.run(
        [*command, *methods, "--epochs", "3", "--resume", "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    results = json.loads((output / "results.json").read_text())
    assert results["config"]["resumed_runs"] == len(kept)
    assert len(list(runs.glob("*.json"))) == 6


def test_figures_label_every_panel_and_keep_legends_off_the_data(tmp_path):
    pytest.importorskip("matplotlib")
    from pml_largest_margin.demo.plots import margins_figure, prototype_figure, roc_figure
    from pml_largest_margin.demo.report import summarize
    from pml_largest_margin.demo.run import RunResult

    assert _demo(tmp_path / "out", "--methods", "normface", "normface-lt10", "--seeds", "2") == 0
    records = [
        json.loads(path.read_text())["run"] for path in sorted((tmp_path / "out/runs").iterdir())
    ]
    from pml_largest_margin.demo.methods import ALL_METHODS

    by_key = {method.key: method for method in ALL_METHODS}
    results = [RunResult.from_dict(record, by_key[record["key"]]) for record in records]
    summary = summarize(results)
    figures = [margins_figure(summary), prototype_figure(results), roc_figure(results)]
    assert None not in figures
    margins, prototypes, roc = figures
    caption = margins._suptitle.get_text()
    assert "standard deviation" in caption and "seeds 0, 1" in caption
    for figure in figures:
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()
        panels = [axis for axis in figure.axes if axis.get_label() != "<colorbar>"]
        for axis in panels:
            if not axis.axison:
                continue
            assert axis.get_xlabel() and axis.get_ylabel(), axis.get_title()
            legend = axis.get_legend()
            if legend is not None:
                box = legend.get_window_extent(renderer)
                assert not any(box.overlaps(other.get_window_extent(renderer)) for other in panels)
    titles = [axis.get_title() for axis in margins.axes]
    assert any(t.startswith("balanced") for t in titles)
    assert any(t.startswith("long-tailed") for t in titles)
    assert [axis.get_title() for axis in roc.axes] == [
        "balanced training set, seed 0",
        "long-tailed training set, seed 0",
    ]
    assert "(seed 0)" in prototypes.axes[0].get_title()


class _Terminal:
    """A stream that says it is a terminal, keeping what is written."""

    def __init__(self) -> None:
        self.written: list[str] = []

    def write(self, text: str) -> int:
        self.written.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


def test_progress_is_one_redrawn_bar_on_a_terminal():
    from pml_largest_margin.cli.progress import Progress

    terminal = _Terminal()
    with Progress(3, "runs", stream=terminal) as progress:
        for step in range(3):
            progress.start(f"run {step}")
            progress.step(f"run {step}", "done")
    text = "".join(terminal.written)
    assert "runs: 3/3" in text and "<00:00" in text  # count and ETA on the bar
    assert "[1/3]" not in text and text.count("\n") == 1  # redrawn in place, no plain lines
    quiet = _Terminal()
    with Progress(3, "runs", stream=quiet, quiet=True) as progress:
        progress.step("run 0")
        progress.write("a message")
    assert quiet.written == []


def test_epoch_lines_print_the_margins_of_every_epoch(tmp_path, capsys):
    methods = ("--methods", "normface", "lm-softmax")
    assert _demo(tmp_path / "plain", *methods, "--epochs", "2") == 0
    captured = capsys.readouterr()
    assert ", epoch " not in captured.out + captured.err
    assert _demo(tmp_path / "lines", *methods, "--epochs", "2", "--epoch-lines") == 0
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if ", epoch " in line]
    assert [line.split(": class margin")[0] for line in lines] == [
        "NormFace, seed 0, epoch 1",
        "NormFace, seed 0, epoch 2",
        "LM-Softmax, seed 0, epoch 1",
        "LM-Softmax, seed 0, epoch 2",
    ]
    assert all("sample margin mean" in line and "bound" in line for line in lines)
    # The last epoch's class margin is that of the trained prototypes, as results.json has it.
    results = json.loads((tmp_path / "lines" / "results.json").read_text())
    printed = float(lines[-1].split(": class margin ")[1].split("°")[0])
    assert printed == pytest.approx(results["methods"][1]["runs"][0]["class_margin_deg"], abs=0.01)
