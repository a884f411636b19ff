"""The Market-1501 folder layout, read for training (``bounding_box_train``) and evaluation.

File names ``0001_c1s1_001051_00.jpg`` give the person id and the camera. pid −1 images are junk
and dropped; pid 0 images (distractors) stay in the gallery as negatives (SPEC section 5).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .image_folder import IMAGE_EXTENSIONS, LabelledImages

_NAME = re.compile(r"^(-?\d+)_c(\d+)")
SPLITS = ("bounding_box_train", "query", "bounding_box_test")


@dataclass(frozen=True)
class ReidImages:
    paths: list[Path]
    pids: np.ndarray
    camids: np.ndarray


def read_reid_folder(folder: Path) -> ReidImages:
    """Images of one Market-1501 folder with their pids and (0-based) camera ids."""
    if not folder.is_dir():
        raise FileNotFoundError(f"Market-1501 layout: folder {folder} is missing")
    paths, pids, camids = [], [], []
    for path in sorted(folder.iterdir()):
        match = _NAME.match(path.name)
        if path.suffix.lower() not in IMAGE_EXTENSIONS or match is None:
            continue
        pid = int(match.group(1))
        if pid == -1:
            continue
        paths.append(path)
        pids.append(pid)
        camids.append(int(match.group(2)) - 1)
    if not paths:
        raise ValueError(f"{folder} holds no images named like 0001_c1s1_001051_00.jpg")
    return ReidImages(paths, np.array(pids, dtype=np.int64), np.array(camids, dtype=np.int64))


def is_market_layout(root: Path) -> bool:
    return all((root / name).is_dir() for name in SPLITS)


def read_market_layout(root: str | Path) -> tuple[LabelledImages, ReidImages, ReidImages]:
    """Training images (pids relabelled 0..C−1, distractors left out), query and gallery."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    train, query, gallery = (read_reid_folder(root / name) for name in SPLITS)
    keep = np.flatnonzero(train.pids > 0)
    identities, labels = np.unique(train.pids[keep], return_inverse=True)
    if len(identities) < 2:
        raise ValueError(f"{root / SPLITS[0]} needs images of at least two identities")
    training = LabelledImages(
        [train.paths[i] for i in keep], labels.astype(np.int64), [str(p) for p in identities]
    )
    return training, query, gallery
