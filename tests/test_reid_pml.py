import numpy as np
import pytest
import torch

from evaluation.pml.reid_accuracy_calculator import ReIDAccuracyCalculator
from evaluation.pml.reid_tester import ReIDTester
from evaluation.reid import evaluate_reid


def problem(seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(8, 6))
    q_pids, g_pids = rng.integers(0, 8, 30), rng.integers(0, 8, 120)
    q_camids, g_camids = rng.integers(0, 3, 30), rng.integers(0, 3, 120)
    query = (centres[q_pids] + rng.normal(size=(30, 6))).astype(np.float32)
    gallery = (centres[g_pids] + rng.normal(size=(120, 6))).astype(np.float32)
    return query, gallery, q_pids, g_pids, q_camids, g_camids


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_calculator_matches_functional_core(metric):
    query, gallery, q_pids, g_pids, q_camids, g_camids = problem()
    calculator = ReIDAccuracyCalculator(ranks=(1, 5), metric=metric, device=torch.device("cpu"))
    accuracies = calculator.get_accuracy(
        query,
        np.stack([q_pids, q_camids], 1),
        gallery,
        np.stack([g_pids, g_camids], 1),
    )
    expected = evaluate_reid(query, gallery, q_pids, g_pids, q_camids, g_camids, metric=metric)
    assert set(accuracies) == {"cmc_rank_1", "cmc_rank_5", "reid_mAP", "reid_mINP"}
    assert accuracies["cmc_rank_1"] == expected.cmc[0]
    assert accuracies["cmc_rank_5"] == expected.cmc[4]
    assert accuracies["reid_mAP"] == pytest.approx(expected.mAP, abs=1e-12)
    assert accuracies["reid_mINP"] == pytest.approx(expected.mINP, abs=1e-12)


def test_calculator_include_and_bad_labels():
    query, gallery, q_pids, g_pids, q_camids, g_camids = problem(1)
    calculator = ReIDAccuracyCalculator(include=("reid_mAP",), device=torch.device("cpu"))
    accuracies = calculator.get_accuracy(
        query, np.stack([q_pids, q_camids], 1), gallery, np.stack([g_pids, g_camids], 1)
    )
    assert list(accuracies) == ["reid_mAP"]
    with pytest.raises(ValueError, match=r"query_labels must be \(n, 2\)"):
        calculator.get_accuracy(query, q_pids, gallery, np.stack([g_pids, g_camids], 1))
    with pytest.raises(ValueError, match="unknown metrics"):
        ReIDAccuracyCalculator(include=("precision_at_1",))
    with pytest.raises(ValueError, match="ranks"):
        ReIDAccuracyCalculator(ranks=(0,))


class Split(torch.utils.data.Dataset):
    def __init__(self, features, pids, camids):
        self.features, self.labels = features, np.stack([pids, camids], 1)

    def __len__(self):
        return len(self.features)

    def __getitem__(self, index):
        return self.features[index], torch.from_numpy(self.labels[index])


def test_tester_passes_pid_and_camid_together():
    query, gallery, q_pids, g_pids, q_camids, g_camids = problem(2)
    tester = ReIDTester(dataloader_num_workers=0, batch_size=16, data_device=torch.device("cpu"))
    accuracies = tester.test(
        {"query": Split(query, q_pids, q_camids), "gallery": Split(gallery, g_pids, g_camids)},
        epoch=0,
        trunk_model=torch.nn.Identity(),
        splits_to_eval=[("query", ["gallery"])],
    )["query"]
    expected = evaluate_reid(query, gallery, q_pids, g_pids, q_camids, g_camids)
    assert accuracies["reid_mAP_level0"] == pytest.approx(expected.mAP, abs=1e-12)
    assert accuracies["cmc_rank_1_level0"] == expected.cmc[0]


def _large_id_problem(dtype):
    # Query pid 2^24 + 1 under camera 0; gallery: pid 2^24 near, pid 2^24 + 1 far, camera 1.
    query = np.array([[0.0, 0.0]], np.float32)
    gallery = np.array([[0.1, 0.0], [1.0, 0.0]], np.float32)
    query_labels = torch.tensor([[2**24 + 1, 0]], dtype=dtype)
    gallery_labels = torch.tensor([[2**24, 1], [2**24 + 1, 1]], dtype=dtype)
    return query, query_labels, gallery, gallery_labels


def test_calculator_keeps_large_person_ids_exact():
    calculator = ReIDAccuracyCalculator(ranks=(1,), device=torch.device("cpu"))
    accuracies = calculator.get_accuracy(*_large_id_problem(torch.int64))
    # The only positive is second: AP = 1/2 (merged ids would score 1.0).
    assert accuracies["reid_mAP"] == 0.5
    assert accuracies["cmc_rank_1"] == 0.0
    tester = ReIDTester(dataloader_num_workers=0, batch_size=2, data_device=torch.device("cpu"))
    query, query_labels, gallery, gallery_labels = _large_id_problem(torch.int64)
    through_tester = tester.test(
        {
            "query": Split(query, query_labels[:, 0].numpy(), query_labels[:, 1].numpy()),
            "gallery": Split(gallery, gallery_labels[:, 0].numpy(), gallery_labels[:, 1].numpy()),
        },
        epoch=0,
        trunk_model=torch.nn.Identity(),
        splits_to_eval=[("query", ["gallery"])],
    )["query"]
    assert through_tester["reid_mAP_level0"] == 0.5


def test_calculator_refuses_labels_it_cannot_hold_exactly():
    calculator = ReIDAccuracyCalculator(ranks=(1,), device=torch.device("cpu"))
    with pytest.raises(ValueError, match="query_labels holds ids of 16777216 or more in float32"):
        calculator.get_accuracy(*_large_id_problem(torch.float32))
    query, gallery, q_pids, g_pids, q_camids, g_camids = problem(3)
    fractional = np.stack([q_pids + 0.4, q_camids], 1)
    with pytest.raises(ValueError, match="query_labels must hold integer ids"):
        calculator.get_accuracy(query, fractional, gallery, np.stack([g_pids, g_camids], 1))
    # Integer-valued float64 labels are exact and give the integer labels' numbers.
    as_float = calculator.get_accuracy(
        query,
        np.stack([q_pids, q_camids], 1).astype(np.float64),
        gallery,
        np.stack([g_pids, g_camids], 1).astype(np.float64),
    )
    as_int = calculator.get_accuracy(
        query, np.stack([q_pids, q_camids], 1), gallery, np.stack([g_pids, g_camids], 1)
    )
    assert as_float == as_int
