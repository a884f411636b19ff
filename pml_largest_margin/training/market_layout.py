"""Re-ID layouts for training: Market-1501 / DukeMTMC-reID folders and MSMT17 list files.

The reading itself (pid and camera from file names, junk pid −1 dropped, distractors pid 0 kept
in the gallery) is :mod:`evaluation.datasets.reid`'s; this module turns its training split into
class labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .image_folder import LabelledImages

if TYPE_CHECKING:
    from evaluation.datasets.reid import ReIDSplit


MARKET_FOLDERS = ("bounding_box_train", "query", "bounding_box_test")


def detect_reid_layout(root: Path) -> str | None:
    """``"market1501"`` or ``"msmt17"`` when ``root`` looks like one, else None."""
    if all((root / name).is_dir() for name in MARKET_FOLDERS):
        return "market1501"
    if (root / "list_train.txt").is_file():
        return "msmt17"
    return None


def _read_splits(root: str | Path, layout: str, names: tuple[str, ...]) -> dict:
    from evaluation.datasets import reid

    reader = {"market1501": reid.read_market1501, "msmt17": reid.read_msmt17}[layout]
    splits = reader(Path(root))
    for name in names:
        if len(splits[name]) == 0:
            raise ValueError(f"{root}: the {name} split has no images")
    return splits


def read_reid_layout(root: str | Path, layout: str) -> tuple[LabelledImages, ReIDSplit, ReIDSplit]:
    """``(training images labelled 0..C−1, query split, gallery split)`` of a re-ID dataset."""
    splits = _read_splits(root, layout, ("train", "query", "gallery"))
    train = splits["train"]
    keep = np.flatnonzero(train.pids > 0)
    identities, labels = np.unique(train.pids[keep], return_inverse=True)
    if len(identities) < 2:
        raise ValueError(f"{root}: training needs images of at least two identities")
    training = LabelledImages(
        [Path(train.paths[i]) for i in keep],
        labels.astype(np.int64),
        [str(pid) for pid in identities],
    )
    return training, splits["query"], splits["gallery"]


def read_reid_test_splits(root: str | Path, layout: str) -> tuple[ReIDSplit, ReIDSplit]:
    """``(query split, gallery split)`` of a re-ID dataset; ValueError if either is empty."""
    splits = _read_splits(root, layout, ("query", "gallery"))
    return splits["query"], splits["gallery"]
