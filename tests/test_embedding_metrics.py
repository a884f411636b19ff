import math

import numpy as np
import pytest
import torch
from references import reference_reid

from pml_largest_margin.training.embedding_metrics import (
    classification_metrics,
    pair_scores,
    retrieval_metrics,
    verification_metrics,
)
from pml_largest_margin.training.loss_factory import build_loss


def _straightforward_map(features, labels):
    """Leave-one-out retrieval by cosine: the shared re-ID reference with every item its own
    camera, so that the only item it drops for a query is the query itself."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    own_camera = np.arange(len(labels))
    reference = reference_reid(-(unit @ unit.T), labels, labels, own_camera, own_camera)
    assert reference.num_skipped_queries == 0
    return reference.mAP, float(reference.cmc[0])


def test_retrieval_removes_only_the_self_match():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, 5))
    labels = rng.integers(0, 4, 40)
    metrics = retrieval_metrics(torch.tensor(features), torch.tensor(labels))
    mean_ap, rank1 = _straightforward_map(features, labels)
    assert metrics["mAP"] == pytest.approx(mean_ap, abs=1e-6)
    assert metrics["rank1"] == pytest.approx(rank1, abs=1e-9)


def test_pair_scores_cover_all_pairs_once():
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    scores, same = pair_scores(embeddings, torch.tensor([0, 0, 1]))
    assert np.allclose(scores, [0.0, math.sqrt(0.5), math.sqrt(0.5)])
    assert same.tolist() == [True, False, False]


def test_verification_of_separable_embeddings():
    embeddings = torch.tensor([[1.0, 0.1], [1.0, -0.1], [-0.1, 1.0], [0.1, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    metrics, curve = verification_metrics(embeddings, labels, far_targets=(0.25,))
    assert metrics["eer"] == 0.0 and metrics["auc"] == 1.0
    assert metrics["tar@far=0.25"] == 1.0
    assert len(curve["far"]) == len(curve["tar"])


def test_classification_metrics_against_direct_computation():
    torch.manual_seed(0)
    loss = build_loss("normface", 3, 4)
    embeddings, labels = torch.randn(30, 4), torch.randint(0, 3, (30,))
    metrics = classification_metrics(embeddings, labels, loss)
    cosines = torch.nn.functional.normalize(embeddings, dim=1) @ torch.nn.functional.normalize(
        loss.W.detach(), dim=0
    )
    assert metrics["accuracy"] == pytest.approx(float((cosines.argmax(1) == labels).float().mean()))
    target = cosines.gather(1, labels[:, None]).squeeze(1)
    others = cosines.scatter(1, labels[:, None], -2.0).amax(1)
    assert metrics["sample_margin_mean"] == pytest.approx(float((target - others).mean()), abs=1e-6)
    unit_w = torch.nn.functional.normalize(loss.W.detach(), dim=0)
    off_diagonal = (unit_w.t() @ unit_w).fill_diagonal_(-2).max()
    assert metrics["class_margin_deg"] == pytest.approx(
        math.degrees(math.acos(off_diagonal)), abs=1e-3
    )
    assert metrics["class_margin_bound_deg"] == pytest.approx(120.0)
    assert metrics["sample_margin_bound"] == pytest.approx(1.5)
