import json

import numpy as np
import pytest

from evaluation.verification import verification_accuracy_10fold, verification_report
from pml_largest_margin.cli import main


@pytest.fixture
def interleaved(tmp_path):
    rng = np.random.default_rng(0)
    issame = rng.integers(0, 2, 200).astype(bool)
    first = rng.normal(size=(200, 8))
    second = np.where(
        issame[:, None], first + 0.8 * rng.normal(size=first.shape), rng.normal(size=first.shape)
    )
    embeddings = np.empty((400, 8), dtype=np.float32)
    embeddings[0::2], embeddings[1::2] = first, second
    path = tmp_path / "pairs.npz"
    np.savez(path, embeddings=embeddings, issame=issame)
    return path, embeddings, issame


def test_interleaved_table_json_and_plot(tmp_path, interleaved, capsys):
    path, embeddings, issame = interleaved
    out_json, out_png = tmp_path / "m.json", tmp_path / "roc.png"
    assert (
        main(
            [
                "eval-verify",
                str(path),
                "--json",
                str(out_json),
                "--plot",
                str(out_png),
                "--far",
                "1e-2",
                "0.1",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "| AUC |" in table and "10-fold accuracy" in table and "| 0.1 |" in table
    summary = json.loads(out_json.read_text())
    expected = verification_accuracy_10fold(embeddings, issame)
    assert summary["ten_fold"]["accuracy_mean"] == expected.accuracy_mean
    assert [row["far"] for row in summary["tar_at_far"]] == [0.01, 0.1]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scores_input_json_to_stdout(tmp_path, capsys):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 500)
    scores = rng.normal(size=500) + labels
    np.savez(tmp_path / "s.npz", scores=scores, labels=labels)
    assert main(["eval-verify", str(tmp_path / "s.npz"), "--json", "-"]) == 0
    summary = json.loads(capsys.readouterr().out)
    report = verification_report(scores, labels)
    assert summary["auc"] == report.auc and summary["eer"] == report.eer
    # The JSON names its counts num_* (the n_* keys of earlier releases are gone from files).
    assert (summary["num_genuine"], summary["num_impostor"]) == (
        int(labels.sum()),
        int((labels == 0).sum()),
    )
    assert not {"n_genuine", "n_impostor"} & set(summary)


def test_embeddings_with_pair_file(tmp_path, capsys):
    rng = np.random.default_rng(2)
    embeddings = rng.normal(size=(30, 4)).astype(np.float32)
    pairs = np.stack([rng.integers(0, 30, 100), rng.integers(0, 30, 100)], axis=1)
    labels = rng.integers(0, 2, 100)
    np.savez(tmp_path / "e.npz", embeddings=embeddings)
    np.savetxt(tmp_path / "pairs.txt", np.column_stack([pairs, labels]), fmt="%d")
    assert (
        main(
            [
                "eval-verify",
                str(tmp_path / "e.npz"),
                "--pairs",
                str(tmp_path / "pairs.txt"),
                "--json",
                "-",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    cosines = np.sum(unit[pairs[:, 0]] * unit[pairs[:, 1]], axis=1)
    assert summary["auc"] == pytest.approx(verification_report(cosines, labels).auc, abs=1e-3)


@pytest.mark.parametrize(
    ("arrays", "extra", "message"),
    [
        ({"scores": np.ones(3)}, [], "needs 'labels'"),
        ({"other": np.ones(3)}, [], "needs 'scores'"),
        ({"embeddings": np.ones((4, 2))}, [], "issame"),
        (
            {"embeddings": np.ones((4, 2)), "pairs": np.array([[0, 9]]), "labels": [1]},
            [],
            "indices",
        ),
        ({"scores": np.array([0.1, np.nan]), "labels": [0, 1]}, [], "NaN"),
        ({"scores": np.array([0.1, 0.2]), "labels": [1, 1]}, [], "no impostor"),
        ({"scores": np.array([0.1, 0.2]), "labels": [0, 1]}, ["--far", "2"], "far_targets"),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, arrays, extra, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    assert main(["eval-verify", str(tmp_path / "bad.npz"), *extra]) == 2
    error = capsys.readouterr().err
    assert (
        message in error
        and error.count("\n") == 1
        and error.startswith("pml-lm eval-verify: error:")
    )


def test_missing_and_unreadable_files_exit_2(tmp_path, capsys):
    assert main(["eval-verify", str(tmp_path / "absent.npz")]) == 2
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert main(["eval-verify", str(tmp_path / "junk.npz")]) == 2
    np.save(tmp_path / "single.npy", np.ones(3))
    assert main(["eval-verify", str(tmp_path / "single.npy")]) == 2
    assert "expected an .npz" in capsys.readouterr().err
