"""Readers of the standard re-ID dataset layouts: paths, person ids and camera ids.

- Market-1501 and DukeMTMC-reID: folders ``bounding_box_train``, ``query`` and
  ``bounding_box_test`` (the gallery) of images named ``PPPP_cC...`` (``0001_c1s1_001051_00.jpg``,
  ``0005_c2_f0046985.jpg``): pid ``PPPP``, camera ``C``.
- MSMT17: list files ``list_train.txt``, ``list_query.txt``, ``list_gallery.txt`` of
  ``relative/path pid`` lines; the camera is the third ``_`` field of the file name
  (``0000_000_01_0303morning_0015_0.jpg``: camera 1). Images live under ``train``/``test``
  (V1) or ``mask_train_v2``/``mask_test_v2`` (V2).

Camera ids are returned 0-based (camera ``C`` gives ``C - 1``). Following docs/theory.md §5,
pid -1 images are junk and dropped; pid 0 images are distractors and kept (gallery negatives).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_FOLDER_NAME = re.compile(r"^(-?\d+)_c(\d+)")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
JUNK_PID = -1


@dataclass(frozen=True)
class ReIDSplit:
    """One split: image paths with their person and (0-based) camera ids."""

    paths: list[str]
    pids: np.ndarray
    camids: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)


def read_market1501(root: str | os.PathLike) -> dict[str, ReIDSplit]:
    """Market-1501 (and DukeMTMC-reID, same layout): ``{"train", "query", "gallery"}``."""
    root = _directory(root)
    folders = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
    return {split: _read_folder(_directory(root / folder)) for split, folder in folders.items()}


read_dukemtmc_reid = read_market1501


def read_msmt17(root: str | os.PathLike) -> dict[str, ReIDSplit]:
    """MSMT17 V1 or V2: ``{"train", "query", "gallery"}`` from its list files."""
    root = _directory(root)
    train_dir = _first_directory(root, ("train", "mask_train_v2"))
    test_dir = _first_directory(root, ("test", "mask_test_v2"))
    return {
        "train": read_msmt17_list(root / "list_train.txt", train_dir),
        "query": read_msmt17_list(root / "list_query.txt", test_dir),
        "gallery": read_msmt17_list(root / "list_gallery.txt", test_dir),
    }


def read_msmt17_list(list_file: str | os.PathLike, image_dir: str | os.PathLike) -> ReIDSplit:
    """One MSMT17 list file of ``relative/path pid`` lines, paths joined to ``image_dir``."""
    list_file, image_dir = Path(list_file), Path(image_dir)
    records = []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        name_fields = Path(fields[0]).name.split("_")
        if len(fields) != 2 or len(name_fields) < 3:
            raise ValueError(f"{list_file}:{number}: expected 'path pid', got {line!r}")
        try:
            pid, camera = int(fields[1]), int(name_fields[2])
        except ValueError:
            raise ValueError(
                f"{list_file}:{number}: cannot read a pid and a camera from {line!r}"
            ) from None
        records.append((str(image_dir / fields[0]), pid, camera))
    return _split(records, str(list_file))


def _read_folder(folder: Path) -> ReIDSplit:
    records = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in _IMAGE_SUFFIXES:
            continue
        match = _FOLDER_NAME.match(path.name)
        if match is None:
            raise ValueError(f"{path}: file name does not start with 'PID_cCAMERA'")
        records.append((str(path), int(match.group(1)), int(match.group(2))))
    return _split(records, str(folder))


def _split(records, source: str) -> ReIDSplit:
    records = [record for record in records if record[1] != JUNK_PID]
    for path, pid, camera in records:
        if pid < 0 or camera < 1:
            raise ValueError(f"{source}: {path} has pid {pid} and camera {camera}")
    return ReIDSplit(
        paths=[path for path, _, _ in records],
        pids=np.array([pid for _, pid, _ in records], dtype=np.int64),
        camids=np.array([camera - 1 for _, _, camera in records], dtype=np.int64),
    )


def _directory(path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a directory")
    return path


def _first_directory(root: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise NotADirectoryError(f"{root} has none of the image folders {names}")
