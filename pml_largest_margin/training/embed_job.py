"""``pml-lm embed``: a checkpoint's network applied to a dataset, as the arrays the evaluators read.

A re-ID layout gives the keys of ``pml-lm eval-reid`` (``query_features``,
``gallery_features``, ``query_pids``, ``gallery_pids``, ``query_camids``, ``gallery_camids``)
plus ``query_paths`` and ``gallery_paths``. An image folder gives those of ``pml-lm
eval-verify`` (``embeddings``, ``pairs``, ``labels``: every pair of images, or a uniform
sample of them, labelled 1 for the same class) plus ``image_labels``, ``class_names`` and
``paths``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .backbones import build_backbone
from .checkpoint import read_checkpoint
from .embedding_metrics import embed
from .image_dataset import ImageDataset, check_images
from .image_folder import read_image_folder
from .market_layout import detect_reid_layout, read_reid_test_splits
from .options import DEFAULT_EMBED_BATCH_SIZE, DEFAULT_EMBED_WORKERS, DEFAULT_MAX_PAIRS

__all__ = ["DEFAULT_MAX_PAIRS", "embed_dataset", "load_trained_network", "pairs_of"]


def load_trained_network(path: Path) -> tuple[torch.nn.Module, tuple[int, int]]:
    """The network of a ``pml-lm train`` checkpoint and the image size (H, W) it was trained at."""
    state = read_checkpoint(path)
    settings = state["settings"]
    # Weights come from the checkpoint: never download torchvision's.
    network = build_backbone(settings["backbone"], settings["embedding_size"], pretrained=False)
    network.load_state_dict(state["models"]["trunk"])
    height, width = settings["image_size"]
    return network, (int(height), int(width))


def _row_start(row: np.ndarray, n: int) -> np.ndarray:
    """Row-major rank of the pair ``(row, row + 1)`` among the pairs i < j of ``n`` items."""
    return row * n - row * (row + 1) // 2


def _linear_to_pair(rank: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-major ``rank`` among the pairs i < j of ``n`` items → ``(i, j)``."""
    rank = rank.astype(np.int64)
    # The root of _row_start(i) = rank, then one step either way for the float rounding.
    row = np.floor(n - 0.5 - np.sqrt((n - 0.5) ** 2 - 2.0 * rank)).astype(np.int64)
    row -= (_row_start(row, n) > rank).astype(np.int64)
    row += (_row_start(row + 1, n) <= rank).astype(np.int64)
    return row, rank - _row_start(row, n) + row + 1


def pairs_of(num_items: int, max_pairs: int, seed: int = 0) -> tuple[np.ndarray, bool]:
    """Pairs ``(i, j)``, i < j, of ``num_items`` items as an (m, 2) int64 array, row-major.

    All of them when there are at most ``max_pairs``, else ``max_pairs`` drawn uniformly
    without replacement (``seed``). Returns the pairs and whether they were sampled.
    """
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be at least 1, got {max_pairs}")
    total = num_items * (num_items - 1) // 2
    if total <= max_pairs:
        first, second = np.triu_indices(num_items, k=1)
        return np.stack([first, second], axis=1).astype(np.int64), False
    ranks = np.sort(np.random.default_rng(seed).choice(total, size=max_pairs, replace=False))
    return np.stack(_linear_to_pair(ranks, num_items), axis=1), True


def _features(network, paths, image_size, device, batch_size, workers, normalize) -> np.ndarray:
    dataset = ImageDataset(paths, np.zeros(len(paths), dtype=np.int64), image_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    features = embed(network.to(device), loader, device)
    if normalize:
        features = torch.nn.functional.normalize(features, dim=1)
    return features.numpy().astype(np.float32)


def embed_dataset(
    checkpoint: Path,
    data: Path,
    *,
    layout: str = "auto",
    device: torch.device,
    batch_size: int = DEFAULT_EMBED_BATCH_SIZE,
    workers: int = DEFAULT_EMBED_WORKERS,
    normalize: bool = True,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], str]:
    """The arrays of the module docstring for ``data``, and the layout read.

    Images are embedded in batches of ``batch_size`` under ``torch.no_grad()``, in eval mode,
    at the checkpoint's image size; ``normalize`` makes every feature unit-length (then
    euclidean and cosine rankings agree).

    Raises:
        FileNotFoundError, ValueError: no checkpoint or not one of ``pml-lm train``; no such
            data folder, an empty split, an unreadable image.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    network, image_size = load_trained_network(checkpoint)
    if layout == "auto":
        layout = (data.is_dir() and detect_reid_layout(data)) or "image-folder"
    options = (image_size, device, batch_size, workers, normalize)
    if layout != "image-folder":
        query, gallery = read_reid_test_splits(data, layout)
        check_images([Path(path) for path in query.paths + gallery.paths])
        arrays = {}
        for name, split in (("query", query), ("gallery", gallery)):
            arrays[f"{name}_features"] = _features(network, split.paths, *options)
            arrays[f"{name}_pids"] = np.asarray(split.pids, dtype=np.int64)
            arrays[f"{name}_camids"] = np.asarray(split.camids, dtype=np.int64)
            arrays[f"{name}_paths"] = np.asarray([str(path) for path in split.paths])
        return arrays, layout
    images = read_image_folder(data)
    check_images(images.paths)
    pairs, _ = pairs_of(len(images.paths), max_pairs, seed)
    labels = images.labels
    return {
        "embeddings": _features(network, images.paths, *options),
        "pairs": pairs,
        "labels": (labels[pairs[:, 0]] == labels[pairs[:, 1]]).astype(np.int64),
        "image_labels": labels.astype(np.int64),
        "class_names": np.asarray(images.class_names),
        "paths": np.asarray([str(path) for path in images.paths]),
    }, layout
