import numpy as np
import pytest
import torch

from evaluation.pml.verification_accuracy_calculator import (
    VerificationAccuracyCalculator,
    tar_metric_name,
)
from evaluation.verification import verification_accuracy_10fold, verification_report


def _interleaved(rng, num_pairs=300, dim=16):
    labels = np.empty(2 * num_pairs, dtype=np.int64)
    labels[0::2] = np.arange(num_pairs)
    same = rng.integers(0, 2, num_pairs).astype(bool)
    labels[1::2] = np.where(same, labels[0::2], labels[0::2] + num_pairs)
    first = rng.normal(size=(num_pairs, dim))
    second = np.where(
        same[:, None], first + rng.normal(size=first.shape), rng.normal(size=first.shape)
    )
    embeddings = np.empty((2 * num_pairs, dim), dtype=np.float32)
    embeddings[0::2], embeddings[1::2] = first, second
    return embeddings, labels, same


def _cosines(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.einsum("ij,ij->i", a, b)


def test_interleaved_metrics_equal_the_core():
    embeddings, labels, same = _interleaved(np.random.default_rng(0))
    targets = (1e-2, 0.1)
    calculator = VerificationAccuracyCalculator(
        far_targets=targets,
        include=(
            "verification_accuracy",
            "verification_auc",
            "verification_eer",
            *map(tar_metric_name, targets),
        ),
        device=torch.device("cpu"),
    )
    result = calculator.get_accuracy(torch.from_numpy(embeddings), torch.from_numpy(labels))
    report = verification_report(_cosines(embeddings[0::2], embeddings[1::2]), same, targets)
    assert (
        result["verification_accuracy"]
        == verification_accuracy_10fold(embeddings, same).accuracy_mean
    )
    assert result["verification_auc"] == pytest.approx(report.auc, abs=1e-12)
    assert result["verification_eer"] == pytest.approx(report.eer, abs=1e-12)
    assert result["tar_at_far_0.01"] == report.tar_at_far_nearest[0]
    assert result["tar_at_far_0.1"] == report.tar_at_far_nearest[1]


def test_all_pairs_threshold_rule_and_pml_metrics_together():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 8, 60)
    embeddings = (np.eye(8)[labels] * 2 + rng.normal(size=(60, 8))).astype(np.float32)
    calculator = VerificationAccuracyCalculator(
        pairs="all",
        far_targets=(0.05,),
        tar_rule="threshold",
        device=torch.device("cpu"),
        include=("precision_at_1", "verification_auc", "tar_at_far_0.05"),
    )
    result = calculator.get_accuracy(torch.from_numpy(embeddings), torch.from_numpy(labels))
    first, second = np.triu_indices(60, k=1)
    scores = _cosines(embeddings[first], embeddings[second])
    report = verification_report(scores, labels[first] == labels[second], (0.05,))
    assert result["verification_auc"] == pytest.approx(report.auc, abs=1e-6)
    assert result["tar_at_far_0.05"] == pytest.approx(report.tar_at_far_threshold[0], abs=2e-3)
    assert 0 <= result["precision_at_1"] <= 1
    assert (
        "verification_accuracy"
        not in VerificationAccuracyCalculator(pairs="all").get_curr_metrics()
    )


def test_bad_configuration_and_input():
    with pytest.raises(ValueError, match="pairs"):
        VerificationAccuracyCalculator(pairs="some")
    with pytest.raises(ValueError, match="tar_rule"):
        VerificationAccuracyCalculator(tar_rule="closest")
    with pytest.raises(ValueError, match="far_targets"):
        VerificationAccuracyCalculator(far_targets=(2.0,))
    calculator = VerificationAccuracyCalculator(
        include=("verification_auc",), device=torch.device("cpu")
    )
    with pytest.raises(ValueError, match="even"):
        calculator.get_accuracy(torch.randn(5, 4), torch.arange(5))
