import json

import numpy as np
import pytest

from pml_largest_margin.demo.methods import BALANCED_METHODS
from pml_largest_margin.demo.report import COLUMNS, markdown_table, summarize, write_json
from pml_largest_margin.demo.run import RunResult


def _metrics(value):
    return {key: value for key, *_ in COLUMNS} | {
        "class_margin_bound_deg": 96.4,
        "sample_margin_bound": 10 / 9,
        "per_class_accuracy": [value] * 10,
    }


def test_mean_and_sample_std_over_seeds(tmp_path):
    results = [
        RunResult(BALANCED_METHODS[0], seed, _metrics(value), 1.0)
        for seed, value in enumerate([0.5, 0.7, 0.9])
    ] + [RunResult(BALANCED_METHODS[1], 0, _metrics(0.2), 1.0)]
    summary = summarize(results)
    assert [entry["method"] for entry in summary] == ["Softmax CE", "NormFace"]
    stats = summary[0]["summary"]["accuracy"]
    assert stats["mean"] == pytest.approx(0.7)
    assert stats["std"] == pytest.approx(np.std([0.5, 0.7, 0.9], ddof=1))
    assert summary[1]["summary"]["accuracy"]["std"] == 0.0
    assert "per_class_accuracy" not in summary[0]["summary"]
    table = markdown_table(summary)
    assert "| Softmax CE | 70.0 ± 20.0 |" in table
    write_json(tmp_path / "r.json", summary, {"seeds": [0, 1, 2]})
    assert json.loads((tmp_path / "r.json").read_text())["methods"][0]["seeds"] == [0, 1, 2]
