"""Images from disk as normalised tensors, with Pillow only (torchvision is optional)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

# Larger sides would exhaust memory in the first batch rather than fail with a clear message.
MIN_IMAGE_SIDE, MAX_IMAGE_SIDE = 8, 4096


def parse_image_size(text: str) -> tuple[int, int]:
    """``"64"`` → (64, 64); ``"128x64"`` → (128, 64) as (height, width)."""
    parts = text.lower().split("x")
    try:
        sizes = [int(part) for part in parts]
    except ValueError:
        sizes = []
    if len(sizes) == 1:
        sizes *= 2
    if len(sizes) != 2 or min(sizes) < MIN_IMAGE_SIDE or max(sizes) > MAX_IMAGE_SIDE:
        raise ValueError(
            f"image size must be N or HxW with sides in [{MIN_IMAGE_SIDE}, {MAX_IMAGE_SIDE}], "
            f"got {text!r}"
        )
    return sizes[0], sizes[1]


def check_images(paths: Sequence[Path]) -> None:
    """Raise ValueError naming the first file Pillow cannot identify (headers only: fast)."""
    from PIL import Image, UnidentifiedImageError

    for path in paths:
        try:
            with Image.open(path):
                pass
        except (OSError, UnidentifiedImageError) as error:
            raise ValueError(f"cannot read image {path}: {error}") from error


def load_image(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """RGB image resized to ``size`` (height, width), as a (3, H, W) tensor in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB").resize((size[1], size[0]), Image.BILINEAR))
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class ImageDataset(torch.utils.data.Dataset):
    """``(image, label)`` pairs; with ``flip``, training images are mirrored at random."""

    def __init__(
        self,
        paths: Sequence[Path],
        labels: np.ndarray,
        size: tuple[int, int],
        flip: bool = False,
    ):
        self.paths = list(paths)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.size = size
        self.flip = flip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = load_image(self.paths[index], self.size)
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, self.labels[index]
