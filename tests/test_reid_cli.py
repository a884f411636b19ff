import json

import numpy as np
import pytest

from evaluation.reid import evaluate_reid
from pml_largest_margin.cli import main


@pytest.fixture
def features_file(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 4))
    q_pids, g_pids = rng.integers(0, 5, 12), rng.integers(0, 5, 40)
    arrays = {
        "query_features": (centres[q_pids] + rng.normal(size=(12, 4))).astype(np.float32),
        "gallery_features": (centres[g_pids] + rng.normal(size=(40, 4))).astype(np.float32),
        "query_pids": q_pids,
        "gallery_pids": g_pids,
        "query_camids": rng.integers(0, 2, 12),
        "gallery_camids": rng.integers(0, 2, 40),
    }
    path = tmp_path / "features.npz"
    np.savez(path, **arrays)
    return path, arrays


def test_eval_reid_end_to_end(features_file, tmp_path, capsys):
    path, arrays = features_file
    out_json, out_png = tmp_path / "m.json", tmp_path / "cmc.png"
    argv = ["eval-reid", str(path), "--metric", "cosine", "--json", str(out_json)]
    assert main([*argv, "--plot", str(out_png), "--device", "cpu"]) == 0
    expected = evaluate_reid(
        *(arrays[k] for k in ("query_features", "gallery_features", "query_pids")),
        *(arrays[k] for k in ("gallery_pids", "query_camids", "gallery_camids")),
        metric="cosine",
    )
    printed = capsys.readouterr().out
    assert f"| mAP | {100 * expected.mAP:.2f} |" in printed
    assert f"| Rank-1 | {100 * expected.cmc[0]:.2f} |" in printed
    saved = json.loads(out_json.read_text())
    assert saved["mAP"] == pytest.approx(expected.mAP)
    assert len(saved["cmc"]) == 40
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_reid_user_errors(features_file, tmp_path, capsys):
    path, arrays = features_file
    missing = tmp_path / "missing_keys.npz"
    np.savez(missing, query_features=arrays["query_features"])
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    nan = dict(arrays, query_features=np.full((12, 4), np.nan, dtype=np.float32))
    nan_path = tmp_path / "nan.npz"
    np.savez(nan_path, **nan)
    for bad, message in [
        (missing, "lacks the keys"),
        (garbage, "cannot be read as .npz: not an .npz archive"),
        (nan_path, "query_features contains NaN"),
        (tmp_path / "absent.npz", "absent.npz"),
    ]:
        assert main(["eval-reid", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("pml-lm eval-reid: error:") and message in err
        assert err.count("\n") == 1


def test_eval_reid_from_a_distance_matrix(features_file, tmp_path, capsys):
    path, arrays = features_file
    rng = np.random.default_rng(1)
    distmat = rng.random((12, 40))
    ids = {k: arrays[k] for k in ("query_pids", "gallery_pids", "query_camids", "gallery_camids")}
    np.savez(tmp_path / "d.npz", distmat=distmat, **ids)
    assert main(["eval-reid", str(tmp_path / "d.npz"), "--max-rank", "5"]) == 0
    printed = capsys.readouterr().out
    assert "Rank-5" in printed and "Rank-10" not in printed
