"""The CLI options of re-ranking, query expansion, bootstrap intervals and distractor curves."""

import json

import numpy as np
import pytest

from evaluation.reid import evaluate_reid
from evaluation.verification import identification_with_distractors, verification_report
from pml_largest_margin.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def reid_file(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 5))
    q_pids, g_pids = rng.integers(0, 6, 20), rng.integers(0, 6, 60)
    arrays = {
        "query_features": (centres[q_pids] + rng.normal(size=(20, 5))).astype(np.float32),
        "gallery_features": (centres[g_pids] + rng.normal(size=(60, 5))).astype(np.float32),
        "query_pids": q_pids,
        "gallery_pids": g_pids,
        "query_camids": rng.integers(0, 3, 20),
        "gallery_camids": rng.integers(0, 3, 60),
    }
    path = tmp_path / "features.npz"
    np.savez(path, **arrays)
    return path, arrays


def test_eval_reid_rerank_bootstrap_and_breakdowns(reid_file, tmp_path, capsys):
    path, arrays = reid_file
    out_json, out_png = tmp_path / "m.json", tmp_path / "cmc.png"
    argv = ["eval-reid", str(path), "--rerank", "torchreid", "--query-expansion", "alpha"]
    argv += ["--bootstrap", "50", "--json", str(out_json), "--plot", str(out_png)]
    assert main([*argv, "--device", "cpu"]) == 0
    ids = [arrays[k] for k in ("query_pids", "gallery_pids", "query_camids", "gallery_camids")]
    expected = evaluate_reid(
        arrays["query_features"],
        arrays["gallery_features"],
        *ids,
        rerank={"convention": "torchreid"},
        query_expansion="alpha",
        metric="cosine",  # the command's default
        bootstrap=50,
        device="cpu",
    )
    printed = capsys.readouterr().out
    low, high = expected.intervals.mAP_low, expected.intervals.mAP_high
    assert f"| mAP | {100 * expected.mAP:.2f} [{100 * low:.2f}, {100 * high:.2f}] |" in printed
    assert "percentile bootstrap over query identities (50 resamples, seed 0)" in printed
    saved = json.loads(out_json.read_text())
    assert saved["mAP"] == pytest.approx(expected.mAP)
    assert saved["intervals"]["mAP"] == pytest.approx([low, high])
    assert set(saved["per_camera"]) == {str(c) for c in set(ids[2].tolist())}
    assert saved["per_identity"] == {str(k): v for k, v in expected.per_identity().items()}
    assert out_png.read_bytes()[:8] == PNG


def test_eval_reid_rerank_needs_features(reid_file, tmp_path, capsys):
    path, arrays = reid_file
    distmat = tmp_path / "distmat.npz"
    np.savez(
        distmat,
        distmat=np.ones((20, 60)),
        **{k: arrays[k] for k in arrays if "pids" in k or "camids" in k},
    )
    assert main(["eval-reid", str(distmat), "--rerank"]) == 2
    assert "need features" in capsys.readouterr().err


@pytest.fixture
def verify_file(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.random(600) < 0.3
    scores = rng.normal(size=600) + 1.2 * labels
    subjects = rng.integers(0, 30, 600)
    ids = np.arange(40)
    centres = rng.normal(size=(40, 8))
    arrays = {
        "scores": scores,
        "labels": labels,
        "subjects": subjects,
        "probe_features": (centres + 0.7 * rng.normal(size=(40, 8))).astype(np.float32),
        "probe_subjects": ids,
        "gallery_features": (centres + 0.7 * rng.normal(size=(40, 8))).astype(np.float32),
        "gallery_subjects": ids,
    }
    path = tmp_path / "pairs.npz"
    np.savez(path, **arrays)
    distractors = tmp_path / "distractors.npy"
    np.save(distractors, rng.normal(size=(150, 8)).astype(np.float32))
    return path, distractors, arrays


def test_eval_verify_bootstrap_and_distractors(verify_file, tmp_path, capsys):
    path, distractors, arrays = verify_file
    out_json, roc_png, curve_png = tmp_path / "m.json", tmp_path / "roc.png", tmp_path / "d.png"
    argv = ["eval-verify", str(path), "--bootstrap", "40", "--seed", "3", "--far", "0.01", "0.1"]
    argv += ["--distractors", str(distractors), "--distractor-plot", str(curve_png)]
    assert main([*argv, "--json", str(out_json), "--plot", str(roc_png)]) == 0
    report = verification_report(
        arrays["scores"],
        arrays["labels"],
        (0.01, 0.1),
        bootstrap=40,
        seed=3,
        subjects=arrays["subjects"],
    )
    curve = identification_with_distractors(
        *(arrays[k] for k in ("probe_features", "probe_subjects", "gallery_features")),
        arrays["gallery_subjects"],
        np.load(distractors),
    )
    printed = capsys.readouterr().out
    low, high = report.intervals.auc
    assert f"| AUC | {100 * report.auc:.3f} [{100 * low:.3f}, {100 * high:.3f}] |" in printed
    assert "percentile bootstrap over subjects (40 resamples, seed 3)" in printed
    assert "| 150 | " in printed
    saved = json.loads(out_json.read_text())
    assert saved["intervals"]["auc"] == pytest.approx([low, high])
    assert saved["distractors"] == json.loads(json.dumps(curve.as_dict()))
    assert roc_png.read_bytes()[:8] == PNG and curve_png.read_bytes()[:8] == PNG


def test_eval_verify_distractor_errors(verify_file, tmp_path, capsys):
    path, distractors, arrays = verify_file
    bare = tmp_path / "bare.npz"
    np.savez(bare, scores=arrays["scores"], labels=arrays["labels"])
    assert main(["eval-verify", str(bare), "--distractors", str(distractors)]) == 2
    assert "needs the input keys probe_features" in capsys.readouterr().err
    assert main(["eval-verify", str(path), "--distractors", str(tmp_path / "none.npy")]) == 2
    assert "is not a file" in capsys.readouterr().err
