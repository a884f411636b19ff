"""Readers of face-verification files: insightface ``.bin`` pair sets and IJB-B/C meta files.

A ``.bin`` file is a pickle of ``(list of encoded images, list of bools)``. Loading a pickle can
run arbitrary code, so it is read with an unpickler that resolves no global except the numpy
pieces a pickled bool array or bool scalar needs, and the byte-string codec of protocol-2
pickles: a file that asks for anything else (``os.system``, ``builtins.eval``, ...) raises
before any of it runs.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# (module, name) pairs a .bin pickle may reference, all pure constructors of data.
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMPY_NUMERIC_MODULES = ("numpy.core.numeric", "numpy._core.numeric")
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    *((module, "_reconstruct") for module in _NUMPY_MODULES),
    *((module, "scalar") for module in _NUMPY_MODULES),
    *((module, "_frombuffer") for module in _NUMPY_NUMERIC_MODULES),  # protocol-5 arrays
}
_ALLOWED_DTYPE_KINDS = "biu"  # issame may come as bool or integer numpy values


def _plain_dtype(spec, *args):
    dtype = np.dtype(spec)
    if dtype.kind not in _ALLOWED_DTYPE_KINDS:
        raise pickle.UnpicklingError(f"refusing numpy dtype {dtype} in a .bin file")
    return dtype


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a .bin file")
        if name == "dtype":
            return _plain_dtype
        return super().find_class(module, name)


def _unpickle_bin(path: Path):
    with open(path, "rb") as handle:
        try:
            return _RestrictedUnpickler(handle, encoding="bytes").load()
        except pickle.UnpicklingError as error:
            raise ValueError(f"{path}: not a safe .bin pair file: {error}") from error
        except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as error:
            raise ValueError(f"{path}: malformed or truncated .bin file ({error!r})") from error


def read_bin_pairs(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
    """The raw content of a ``.bin`` file: encoded images (2 per pair) and ``issame`` (bool)."""
    path = Path(path)
    content = _unpickle_bin(path)
    if not (isinstance(content, tuple | list) and len(content) == 2):
        raise ValueError(f"{path}: expected a pickled (images, issame) pair")
    images, issame = content
    if not isinstance(images, list | tuple) or not all(
        isinstance(image, bytes | bytearray) for image in images
    ):
        raise ValueError(f"{path}: the first entry must be a list of encoded images (bytes)")
    issame_array = np.asarray(issame)
    if issame_array.ndim != 1 or issame_array.dtype.kind not in _ALLOWED_DTYPE_KINDS:
        raise ValueError(f"{path}: issame must be a flat list of bools")
    if not np.isin(issame_array, (0, 1)).all():
        raise ValueError(f"{path}: issame must hold only booleans")
    if len(images) != 2 * issame_array.shape[0]:
        raise ValueError(
            f"{path}: {len(images)} images for {issame_array.shape[0]} pairs (expected 2 per pair)"
        )
    return list(images), issame_array.astype(bool)


def decode_images(
    encoded, image_size: tuple[int, int] | None = None, normalize: bool = True
) -> torch.Tensor:
    """Encoded images to a float32 tensor (N, 3, H, W) in RGB: ``(x / 255 − 0.5) / 0.5`` when
    ``normalize`` (the arcface_torch convention), else 0..255. ``image_size=(H, W)`` resizes
    images of another size (bilinear); without it every image must have the first one's size."""
    import torch
    from PIL import Image, UnidentifiedImageError

    if len(encoded) == 0:
        raise ValueError("no images to decode")
    batch = None
    for position, data in enumerate(encoded):
        try:
            with Image.open(io.BytesIO(data)) as image:
                rgb = image.convert("RGB")
                if image_size is not None and rgb.size != (image_size[1], image_size[0]):
                    rgb = rgb.resize((image_size[1], image_size[0]), Image.BILINEAR)
                pixels = np.asarray(rgb)
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise ValueError(f"image {position} cannot be decoded: {error}") from error
        if batch is None:
            batch = np.empty((len(encoded), 3, *pixels.shape[:2]), dtype=np.float32)
        if pixels.shape[:2] != batch.shape[2:]:
            raise ValueError(
                f"image {position} is {pixels.shape[:2]}, the first was {batch.shape[2:]}: "
                "pass image_size to resize"
            )
        batch[position] = pixels.transpose(2, 0, 1)
    if normalize:
        batch = (batch / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(batch)


def load_bin(
    path: str | os.PathLike, image_size: tuple[int, int] | None = None, normalize: bool = True
) -> tuple[torch.Tensor, np.ndarray]:
    """An insightface ``.bin`` pair set: ``(images, issame)``, images a float32 tensor
    (2 n, 3, H, W) with pairs interleaved (rows 0::2 against 1::2), issame a bool array (n,).

    The pickle is read without resolving any callable but a few numpy data constructors, so a
    hostile file raises ``ValueError`` and runs nothing; truncated or malformed files, and
    images that do not decode, raise ``ValueError`` too. See :func:`decode_images`.
    """
    encoded, issame = read_bin_pairs(path)
    return decode_images(encoded, image_size, normalize), issame


def _text_rows(path, columns: int, name: str) -> list[list[str]]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < columns:
                raise ValueError(
                    f"{path}:{line_number}: a {name} line needs {columns} fields, got {line!r}"
                )
            rows.append(fields)
    if not rows:
        raise ValueError(f"{path}: empty {name} file")
    return rows


def _integer_column(rows: list[list[str]], column: int, path, name: str) -> np.ndarray:
    try:
        return np.array([int(row[column]) for row in rows], dtype=np.int64)
    except ValueError as error:
        raise ValueError(f"{path}: {name} must be integers ({error})") from error


def read_template_media_list(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IJB ``*_face_tid_mid.txt``: lines ``image_name template_id media_id``; returns
    ``(image_names, template_ids, media_ids)``."""
    rows = _text_rows(path, 3, "template/media")
    names = np.array([row[0] for row in rows])
    return (
        names,
        _integer_column(rows, 1, path, "template ids"),
        _integer_column(rows, 2, path, "media ids"),
    )


def read_template_pairs(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IJB ``*_template_pair_label.txt``: lines ``template_1 template_2 label`` (label 1 for
    genuine); returns ``(template_1, template_2, labels as bool)``."""
    try:
        with warnings.catch_warnings():
            # An empty file is reported below as a ValueError, not as numpy's warning.
            warnings.filterwarnings("ignore", "loadtxt: input contained no data")
            table = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except ValueError as error:
        raise ValueError(f"{path}: pair lines must be three integers ({error})") from error
    if table.shape[0] == 0:
        raise ValueError(f"{path}: empty template pair file")
    if table.shape[1] != 3:
        raise ValueError(f"{path}: expected lines 'template_1 template_2 label', got {table.shape}")
    if not np.isin(table[:, 2], (0, 1)).all():
        raise ValueError(f"{path}: labels must be 0 or 1")
    return table[:, 0], table[:, 1], table[:, 2].astype(bool)


def read_detector_scores(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """IJB ``*_name_5pts_score.txt``: ``image_name`` first, the detector (faceness) score last;
    returns ``(image_names, scores)``."""
    rows = _text_rows(path, 2, "detector score")
    try:
        scores = np.array([float(row[-1]) for row in rows])
    except ValueError as error:
        raise ValueError(f"{path}: the last field must be a score ({error})") from error
    if not np.isfinite(scores).all():
        raise ValueError(f"{path}: detector scores contain NaN or Inf")
    return np.array([row[0] for row in rows]), scores
