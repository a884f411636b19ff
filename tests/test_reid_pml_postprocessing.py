import numpy as np
import pytest
import torch
from test_reid_pml import Split, problem

from evaluation.pml.reid_accuracy_calculator import ReIDAccuracyCalculator
from evaluation.pml.reid_tester import ReIDTester
from evaluation.reid import evaluate_reid


def test_calculator_reranks_and_expands_like_the_core():
    query, gallery, q_pids, g_pids, q_camids, g_camids = problem(3)
    options = {"rerank": {"k1": 8, "k2": 3}, "query_expansion": "average"}
    calculator = ReIDAccuracyCalculator(device=torch.device("cpu"), **options)
    accuracies = calculator.get_accuracy(
        query, np.stack([q_pids, q_camids], 1), gallery, np.stack([g_pids, g_camids], 1)
    )
    ids = (q_pids, g_pids, q_camids, g_camids)
    expected = evaluate_reid(query, gallery, *ids, device="cpu", **options)
    plain = evaluate_reid(query, gallery, *ids, device="cpu")
    assert accuracies["reid_mAP"] == pytest.approx(expected.mAP, abs=1e-12)
    assert accuracies["reid_mAP"] != pytest.approx(plain.mAP, abs=1e-6)
    with pytest.raises(ValueError, match="k1"):
        ReIDAccuracyCalculator(rerank={"k1": 0})
    with pytest.raises(ValueError, match="query_expansion"):
        ReIDAccuracyCalculator(query_expansion="nope")


def test_tester_forwards_rerank():
    query, gallery, q_pids, g_pids, q_camids, g_camids = problem(4)
    tester = ReIDTester(
        dataloader_num_workers=0,
        batch_size=16,
        data_device=torch.device("cpu"),
        rerank={"k1": 8, "k2": 3},
    )
    accuracies = tester.test(
        {"query": Split(query, q_pids, q_camids), "gallery": Split(gallery, g_pids, g_camids)},
        epoch=0,
        trunk_model=torch.nn.Identity(),
        splits_to_eval=[("query", ["gallery"])],
    )["query"]
    ids = (q_pids, g_pids, q_camids, g_camids)
    expected = evaluate_reid(query, gallery, *ids, rerank={"k1": 8, "k2": 3}, device="cpu")
    assert accuracies["reid_mAP_level0"] == pytest.approx(expected.mAP, abs=1e-12)
    with pytest.raises(ValueError, match="not the tester"):
        ReIDTester(accuracy_calculator=ReIDAccuracyCalculator(), rerank=True)
