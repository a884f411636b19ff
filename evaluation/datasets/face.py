"""Readers of face-verification files: insightface ``.bin`` pair sets and IJB-B/C meta files.

A ``.bin`` file is a pickle of ``(list of encoded images, list of bools)``. Loading a pickle can
run arbitrary code and, from a few bytes, allocate gigabytes, so a file is read in two passes:

1. A scan of its opcodes that builds nothing: only the opcodes a pickled list of byte strings
   and a bool or integer numpy array need are allowed; every length-prefixed argument must fit
   in what is left of the file; memo indices must be consecutive (the unpickler sizes its memo
   table from the largest index); at most :data:`MAX_PICKLE_OPCODES` opcodes (which bounds the
   per-object overhead) and frames of at most 4 MiB; text arguments may only hold characters a
   ``latin1`` string holds (one byte each).
2. The unpickling itself, by an unpickler that resolves no global except the numpy pieces a
   pickled bool/integer array or scalar needs and the byte-string codec of protocol-2 pickles;
   arrays must come with their data (``_reconstruct`` may only make the empty array the data is
   then set on).

So before any check fails, a file costs at most its own size plus a small constant (about
32 MiB of object overhead at the opcode limit), and decoding adds the decoded images
(:func:`decode_images`, each image at most :data:`MAX_IMAGE_PIXELS` pixels by default).
Whatever is wrong with a file, the error is a ``ValueError`` naming the file and the reason.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

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
_LATIN1_NAMES = ("latin1", "latin-1", "iso-8859-1", "iso8859-1")

#: Most opcodes a ``.bin`` pickle may hold: about 2 per image, so some 130,000 images (the
#: largest insightface test sets hold 14,000). Each opcode costs the unpickler at most about
#: 128 bytes beyond its argument's data, hence at most 32 MiB of overhead.
MAX_PICKLE_OPCODES = 2**18
#: Default most pixels of one image of a ``.bin`` file (2048 x 2048; the test sets are 112 x 112).
MAX_IMAGE_PIXELS = 2**22
_MAX_FRAME_BYTES = 4 * 2**20
_MAX_LINE_BYTES = 4096
_SCAN_CHUNK_BYTES = 2**20

_ALLOWED_OPCODES = frozenset(
    """PROTO FRAME STOP MARK EMPTY_LIST APPEND APPENDS EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3
    NONE NEWTRUE NEWFALSE BININT BININT1 BININT2 LONG1 BINBYTES SHORT_BINBYTES BINBYTES8
    BYTEARRAY8 BINSTRING SHORT_BINSTRING BINUNICODE SHORT_BINUNICODE BINUNICODE8 GLOBAL
    STACK_GLOBAL REDUCE BUILD BINPUT LONG_BINPUT MEMOIZE BINGET LONG_BINGET""".split()
)
# Argument layouts (pickletools' names): fixed-size integers, and data after a length prefix.
_FIXED_ARGUMENTS = {"uint1": "<B", "uint2": "<H", "int4": "<i", "uint4": "<I", "uint8": "<Q"}
_LENGTH_PREFIXES = {
    "long1": "<B",
    "bytes1": "<B",
    "string1": "<B",
    "unicodestring1": "<B",
    "string4": "<i",
    "bytes4": "<I",
    "unicodestring4": "<I",
    "bytes8": "<Q",
    "bytearray8": "<Q",
    "unicodestring8": "<Q",
}
_TEXT_ARGUMENTS = ("unicodestring1", "unicodestring4", "unicodestring8")
# UTF-8 bytes from 0xC4 up start characters beyond latin1 (two or four bytes each in a str).
_FIRST_NON_LATIN1_UTF8_BYTE = 0xC4


class _UnsafeFile(Exception):
    """A reason to refuse a file, found by the scan."""


def _read_exactly(handle: BinaryIO, size: int, remaining: int) -> bytes:
    if size > remaining:
        raise _UnsafeFile(f"an argument of {size} bytes but only {remaining} bytes remain")
    data = handle.read(size)
    if len(data) != size:
        raise _UnsafeFile("the file ends inside an argument")
    return data


def _skip_data(handle: BinaryIO, size: int, remaining: int, text: bool) -> None:
    if size < 0 or size > remaining:
        raise _UnsafeFile(f"an argument of {size} bytes but only {remaining} bytes remain")
    if not text:
        handle.seek(size, os.SEEK_CUR)
        return
    while size:
        chunk = handle.read(min(size, _SCAN_CHUNK_BYTES))
        if np.frombuffer(chunk, np.uint8).max(initial=0) >= _FIRST_NON_LATIN1_UTF8_BYTE:
            raise _UnsafeFile("a text argument holds characters beyond latin1")
        size -= len(chunk)


def _scan_opcodes(handle: BinaryIO, file_size: int) -> None:
    """Walk the opcodes up to STOP without building anything (see the module docstring)."""
    memo_size = 0
    for _ in range(MAX_PICKLE_OPCODES + 1):
        code = handle.read(1)
        if not code:
            raise _UnsafeFile("the file ends before the pickle's STOP")
        opcode = pickletools.code2op.get(code.decode("latin1"))
        if opcode is None or opcode.name not in _ALLOWED_OPCODES:
            name = f"opcode {code!r}" if opcode is None else f"the {opcode.name} opcode"
            raise _UnsafeFile(f"{name} has no place in a .bin pair file")
        if opcode.name == "STOP":
            return
        argument = None if opcode.arg is None else opcode.arg.name
        remaining = file_size - handle.tell()
        if argument in _FIXED_ARGUMENTS:
            layout = _FIXED_ARGUMENTS[argument]
            (value,) = struct.unpack(
                layout, _read_exactly(handle, struct.calcsize(layout), remaining)
            )
            remaining -= struct.calcsize(layout)
            if opcode.name == "PROTO" and value > pickle.HIGHEST_PROTOCOL:
                raise _UnsafeFile(f"unknown pickle protocol {value}")
            if opcode.name == "FRAME" and value > min(_MAX_FRAME_BYTES, remaining):
                raise _UnsafeFile(f"a frame of {value} bytes")
            if opcode.name in ("BINPUT", "LONG_BINPUT"):
                if value > memo_size:
                    raise _UnsafeFile(f"memo index {value} out of sequence (next is {memo_size})")
                memo_size += value == memo_size
            if opcode.name in ("BINGET", "LONG_BINGET") and value >= memo_size:
                raise _UnsafeFile(f"memo index {value} read before it is written")
        elif argument in _LENGTH_PREFIXES:
            layout = _LENGTH_PREFIXES[argument]
            (size,) = struct.unpack(
                layout, _read_exactly(handle, struct.calcsize(layout), remaining)
            )
            remaining -= struct.calcsize(layout)
            _skip_data(handle, size, remaining, text=argument in _TEXT_ARGUMENTS)
        elif argument == "stringnl_noescape_pair":  # GLOBAL: module and name, one line each
            for _part in ("module", "name"):
                line = handle.readline(_MAX_LINE_BYTES)
                if not line.endswith(b"\n"):
                    raise _UnsafeFile("a GLOBAL name is cut short or too long")
        elif opcode.name == "MEMOIZE":
            memo_size += 1
    raise _UnsafeFile(f"more than {MAX_PICKLE_OPCODES} opcodes")


def _plain_dtype(spec, align=False, copy=False):
    # Always a fresh dtype: the BUILD that follows in a pickle sets its byte order, which must
    # not (and on numpy's shared builtin dtypes silently does not) apply to a shared instance.
    dtype = np.dtype(spec, align=bool(align), copy=True)
    if dtype.kind not in _ALLOWED_DTYPE_KINDS or dtype.subdtype is not None:
        raise pickle.UnpicklingError(f"refusing numpy dtype {dtype} in a .bin file")
    return dtype


def _empty_array(reconstruct):
    def empty_array(subtype, shape, dtype):
        # ndarray.__reduce__ always makes an empty array and sets shape and data with BUILD; any
        # other shape would be allocated here without a byte of it being in the file.
        if subtype is not np.ndarray or shape != (0,):
            raise pickle.UnpicklingError("refusing an array without its data")
        return reconstruct(subtype, shape, _plain_dtype(dtype))

    return empty_array


def _latin1_encode(encode):
    def latin1_encode(text, encoding="utf-8", *args):
        if not isinstance(text, str) or encoding not in _LATIN1_NAMES:
            raise pickle.UnpicklingError(f"refusing to encode with {encoding!r}")
        return encode(text, encoding)

    return latin1_encode


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a .bin file")
        if name == "dtype":
            return _plain_dtype
        found = super().find_class(module, name)
        if name == "_reconstruct":
            return _empty_array(found)
        if name == "encode":
            return _latin1_encode(found)
        return found


def _unpickle_bin(path: Path):
    try:
        with open(path, "rb") as handle:
            file_size = os.fstat(handle.fileno()).st_size
            _scan_opcodes(handle, file_size)
            handle.seek(0)
            return _RestrictedUnpickler(handle, encoding="bytes").load()
    except _UnsafeFile as error:
        raise ValueError(f"{path}: not a safe .bin pair file: {error}") from None
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path}: not a safe .bin pair file: {error}") from error
    except OSError:
        raise
    except Exception as error:  # anything else a malformed pickle makes the unpickler raise
        raise ValueError(f"{path}: malformed or truncated .bin file ({error!r})") from error


def read_bin_pairs(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
    """The raw content of a ``.bin`` file: encoded images (2 per pair) and ``issame`` (bool).

    ``issame`` may be a list of bools (or 0/1 integers, numpy bool or integer scalars) or a
    1-D numpy bool or integer array of any byte order.

    Raises:
        ValueError: the file is not a safe, well-formed pair file (see the module docstring);
            the message names the file and the reason.
    """
    path = Path(path)
    content = _unpickle_bin(path)
    if not (isinstance(content, tuple | list) and len(content) == 2):
        raise ValueError(f"{path}: expected a pickled (images, issame) pair")
    images, issame = content
    if not isinstance(images, list | tuple):
        raise ValueError(f"{path}: the first entry must be a list of encoded images (bytes)")
    if not (
        isinstance(issame, list | tuple) or (isinstance(issame, np.ndarray) and issame.ndim == 1)
    ):
        raise ValueError(f"{path}: issame must be a flat list of bools")
    if len(images) != 2 * len(issame):
        raise ValueError(
            f"{path}: {len(images)} images for {len(issame)} pairs (expected 2 per pair)"
        )
    if not all(isinstance(image, bytes | bytearray) for image in images):
        raise ValueError(f"{path}: the first entry must be a list of encoded images (bytes)")
    if not all(isinstance(value, bool | int | np.bool_ | np.integer) for value in issame):
        raise ValueError(f"{path}: issame must be a flat list of bools")
    issame_array = np.asarray(issame)
    if issame_array.ndim != 1 or (
        issame_array.size and issame_array.dtype.kind not in _ALLOWED_DTYPE_KINDS
    ):
        raise ValueError(f"{path}: issame must be a flat list of bools")
    if not np.isin(issame_array, (0, 1)).all():
        raise ValueError(f"{path}: issame must hold only booleans")
    return list(images), issame_array.astype(bool)


def decode_images(
    encoded: Sequence[bytes],
    image_size: tuple[int, int] | None = None,
    normalize: bool = True,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> torch.Tensor:
    """Encoded images to a float32 tensor (N, 3, H, W) in RGB: ``(x / 255 − 0.5) / 0.5`` when
    ``normalize`` (the arcface_torch convention), else 0..255. ``image_size=(H, W)`` resizes
    images of another size (bilinear); without it every image must have the first one's size.

    An image is refused before it is decoded when its header declares more than
    ``max_image_pixels`` pixels (default :data:`MAX_IMAGE_PIXELS`), so one decoded image costs
    at most a few times that in bytes; the result itself is 12 bytes per pixel.

    Raises:
        ValueError: an image does not decode, is too large, or differs in size from the first
            without ``image_size``.
    """
    import torch
    from PIL import Image, UnidentifiedImageError

    if len(encoded) == 0:
        raise ValueError("no images to decode")
    if (
        isinstance(max_image_pixels, bool)
        or not isinstance(max_image_pixels, int)
        or max_image_pixels < 1
    ):
        raise ValueError(f"max_image_pixels must be a positive integer, got {max_image_pixels!r}")
    batch = None
    for position, data in enumerate(encoded):
        try:
            with warnings.catch_warnings():
                # Pillow's own bomb limit is far above ours; ours is checked right below.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
            with image:
                width, height = image.size
                if width * height > max_image_pixels:
                    raise ValueError(
                        f"image {position} is {width} x {height} pixels, more than "
                        f"max_image_pixels={max_image_pixels}"
                    )
                rgb = image.convert("RGB")
                if image_size is not None and rgb.size != (image_size[1], image_size[0]):
                    rgb = rgb.resize((image_size[1], image_size[0]), Image.BILINEAR)
                pixels = np.asarray(rgb)
        except Image.DecompressionBombError as error:
            raise ValueError(
                f"image {position} is more than max_image_pixels={max_image_pixels} ({error})"
            ) from error
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
        # In place (no full-size temporaries), with the same float32 operations in the same order.
        np.divide(batch, np.float32(255), out=batch)
        np.subtract(batch, np.float32(0.5), out=batch)
        np.divide(batch, np.float32(0.5), out=batch)
    return torch.from_numpy(batch)


def load_bin(
    path: str | os.PathLike,
    image_size: tuple[int, int] | None = None,
    normalize: bool = True,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[torch.Tensor, np.ndarray]:
    """An insightface ``.bin`` pair set: ``(images, issame)``, images a float32 tensor
    (2 n, 3, H, W) with pairs interleaved (rows 0::2 against 1::2), issame a bool array (n,).

    The file is scanned before it is unpickled and unpickled without resolving any callable but
    a few numpy data constructors (see the module docstring): a hostile file runs nothing, and
    a file of S bytes holding images that decode to D bytes costs at most about S + D plus a
    small constant. See :func:`decode_images` for ``image_size``, ``normalize`` and
    ``max_image_pixels``.

    Raises:
        ValueError: a malformed, truncated or hostile file, or an image that does not decode or
            is too large; the message names the file (or the image) and the reason.
    """
    encoded, issame = read_bin_pairs(path)
    try:
        images = decode_images(encoded, image_size, normalize, max_image_pixels)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    return images, issame


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
