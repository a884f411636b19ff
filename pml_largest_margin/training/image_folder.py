"""Labelled image lists: a class-per-sub-folder tree, and a stratified held-out split of it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class LabelledImages:
    """Image paths with integer labels ``0..len(class_names)-1``."""

    paths: list[Path]
    labels: np.ndarray
    class_names: list[str]

    def subset(self, indices: np.ndarray) -> LabelledImages:
        return LabelledImages(
            [self.paths[i] for i in indices], self.labels[indices], self.class_names
        )


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def read_image_folder(root: str | Path) -> LabelledImages:
    """Every image under ``root/<class name>/`` (sub-folders sorted by name give the labels).

    Raises FileNotFoundError / NotADirectoryError for a missing root, ValueError when fewer than
    two class folders hold images.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"data folder {root} is not a directory")
    classes = []
    for folder in sorted(path for path in root.iterdir() if path.is_dir()):
        images = _images_in(folder)
        if images:
            classes.append((folder.name, images))
    if len(classes) < 2:
        raise ValueError(
            f"{root} needs at least two class sub-folders with images "
            f"({', '.join(IMAGE_EXTENSIONS)}), found {len(classes)}"
        )
    paths = [path for _, images in classes for path in images]
    labels = np.concatenate([np.full(len(images), i) for i, (_, images) in enumerate(classes)])
    return LabelledImages(paths, labels.astype(np.int64), [name for name, _ in classes])


def stratified_holdout(
    labels: np.ndarray, fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, held_out)``: about ``fraction`` of every class held out.

    A class with at least two images gives at least one to each side; a class with one image
    stays in training (its accuracy cannot then be measured).
    """
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must lie in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    held_out = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        if len(members) >= 2:
            count = min(len(members) - 1, max(1, round(fraction * len(members))))
            held_out.append(members[:count])
    test = np.sort(np.concatenate(held_out)) if held_out else np.empty(0, dtype=np.int64)
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test
