"""What a trained embedding is worth: classification and margins, retrieval, verification.

Margins come from ``pml_largest_margin.margins``, retrieval from ``evaluation.reid`` and
verification from ``evaluation.verification``: this module only arranges their inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from pml_largest_margin.margins import (
    class_margin,
    class_margin_upper_bound,
    sample_margin_upper_bound,
    sample_margins,
)

FAR_TARGETS = (1e-2, 1e-3)


@torch.no_grad()
def embed(
    model: torch.nn.Module,
    inputs: torch.Tensor | Iterable,
    device: torch.device,
    batch_size: int = 512,
) -> torch.Tensor:
    """Embeddings of ``inputs`` (a tensor, or a loader yielding ``(inputs, labels)``), on the CPU."""
    model.eval()
    batches = inputs.split(batch_size) if isinstance(inputs, torch.Tensor) else inputs
    outputs = []
    for batch in batches:
        if isinstance(batch, (list, tuple)):
            batch = batch[0]
        outputs.append(model(batch.to(device)).float().cpu())
    return torch.cat(outputs)


@torch.no_grad()
def classification_metrics(
    embeddings: torch.Tensor, labels: torch.Tensor, loss: torch.nn.Module
) -> dict:
    """Accuracy of the loss's own decision rule, class margin of its ``W``, test sample margins.

    With sub-centres (``loss.sub_centers`` k > 1) a class's cosine is its best sub-centre's, the
    class margin skips pairs of one class, and the centroid is that of all C·k unit sub-centres.
    """
    W = loss.W.detach().float().cpu()
    sub_centers = getattr(loss, "sub_centers", 1)
    num_classes, embedding_size = W.shape[1] // sub_centers, W.shape[0]
    # The loss may sit on a GPU; its decision is taken there, the counting here.
    predictions = loss.get_logits(embeddings.to(loss.W.device)).argmax(dim=1).cpu()
    correct = (predictions == labels).float()
    per_class = torch.zeros(num_classes).index_add_(0, labels, correct)
    per_class /= torch.bincount(labels, minlength=num_classes).clamp(min=1)
    margins = sample_margins(embeddings, labels, W, sub_centers=sub_centers)
    centroid = torch.nn.functional.normalize(W, dim=0).mean(dim=1)
    return {
        "accuracy": float(correct.mean()),
        "per_class_accuracy": per_class.tolist(),
        "class_margin_deg": class_margin(W, sub_centers=sub_centers).degrees,
        "class_margin_bound_deg": math.degrees(
            class_margin_upper_bound(num_classes, embedding_size)
        ),
        "sample_margin_min": float(margins.min()),
        "sample_margin_mean": float(margins.mean()),
        "sample_margin_bound": sample_margin_upper_bound(num_classes),
        "prototype_centroid_norm": float(centroid.norm()),
    }


def retrieval_metrics(embeddings: torch.Tensor, labels: torch.Tensor) -> dict:
    """Every sample queries all the others (cosine distance; class = identity).

    Query and gallery are the same set and each sample gets its own camera id, so the re-ID
    protocol's "same identity and same camera" rule removes exactly the self-match.
    """
    from evaluation.reid import evaluate_reid

    features = embeddings.numpy()
    ids = labels.numpy()
    cameras = np.arange(len(ids))
    result = evaluate_reid(features, features, ids, ids, cameras, cameras, metric="cosine")
    return {"mAP": float(result.mAP), "mINP": float(result.mINP), "rank1": result.rank(1)}


def pair_scores(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Cosine scores and same-class flags of all pairs i < j."""
    unit = torch.nn.functional.normalize(embeddings.double(), dim=1)
    rows, columns = torch.triu_indices(len(labels), len(labels), offset=1)
    scores = (unit[rows] * unit[columns]).sum(dim=1)
    return scores.numpy(), (labels[rows] == labels[columns]).numpy()


def verification_metrics(
    embeddings: torch.Tensor, labels: torch.Tensor, far_targets: Sequence[float] = FAR_TARGETS
) -> tuple[dict, dict]:
    """EER, AUC and TAR@FAR ("nearest ROC point" rule) over all test pairs, and the ROC curve."""
    from evaluation.verification import verification_report

    scores, same = pair_scores(embeddings, labels)
    report = verification_report(scores, same, far_targets)
    metrics = {"eer": float(report.eer), "auc": float(report.auc)}
    for far, tar in zip(report.far_targets, report.tar_at_far_nearest, strict=True):
        metrics[f"tar@far={far:g}"] = float(tar)
    return metrics, {"far": report.far, "tar": report.tar}
