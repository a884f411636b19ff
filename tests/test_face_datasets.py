import io
import os
import pickle
import struct
import warnings
import zlib

import numpy as np
import pytest

from evaluation.datasets import face
from evaluation.datasets.face import (
    read_bin_pairs,
    read_detector_scores,
    read_template_media_list,
    read_template_pairs,
)
from evaluation.verification import load_bin

Image = pytest.importorskip("PIL.Image")


def _encoded(pixels, image_format):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format)
    return buffer.getvalue()


def _write_bin(path, images, issame, protocol=pickle.HIGHEST_PROTOCOL):
    with open(path, "wb") as handle:
        pickle.dump((images, issame), handle, protocol=protocol)


@pytest.fixture
def tiny_images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for _ in range(4)]


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_load_bin_round_trip(tmp_path, tiny_images, protocol):
    encoded = [_encoded(pixels, "PNG") for pixels in tiny_images]
    path = tmp_path / "tiny.bin"
    _write_bin(path, encoded, [True, False], protocol)
    images, issame = load_bin(path)
    assert images.shape == (4, 3, 6, 5) and str(images.dtype) == "torch.float32"
    assert issame.tolist() == [True, False]
    expected = np.stack(tiny_images).transpose(0, 3, 1, 2) / 255.0 * 2 - 1
    np.testing.assert_allclose(images.numpy(), expected, atol=1e-6)
    raw, _ = load_bin(path, normalize=False)
    assert np.array_equal(raw.numpy(), np.stack(tiny_images).transpose(0, 3, 1, 2))


def test_load_bin_jpeg_numpy_bools_and_resize(tmp_path, tiny_images):
    encoded = [_encoded(pixels, "JPEG") for pixels in tiny_images]
    path = tmp_path / "numpy_bools.bin"
    _write_bin(path, encoded, [np.bool_(True), np.bool_(True)])
    images, issame = load_bin(path, image_size=(8, 7))
    assert images.shape == (4, 3, 8, 7) and issame.tolist() == [True, True]
    _write_bin(path, encoded, np.array([False, True]))
    assert read_bin_pairs(path)[1].tolist() == [False, True]


class _Hostile:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _FileCreator:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_hostile_pickles_raise_and_run_nothing(tmp_path):
    marker = tmp_path / "pwned"
    for payload in (_Hostile(f"touch {marker}"), _FileCreator(str(marker))):
        path = tmp_path / "hostile.bin"
        _write_bin(path, [b"x", payload], [True])
        with pytest.raises(ValueError, match="refusing"):
            load_bin(path)
        assert not marker.exists()
    # A payload hidden where issame should be is refused the same way.
    _write_bin(tmp_path / "hostile2.bin", [b"x", b"y"], _Hostile(f"touch {marker}"))
    with pytest.raises(ValueError, match="refusing"):
        load_bin(tmp_path / "hostile2.bin")
    assert not marker.exists()


def test_object_dtype_arrays_are_refused(tmp_path):
    path = tmp_path / "objects.bin"
    _write_bin(path, [b"x", b"y"], np.array([True], dtype=object))
    with pytest.raises(ValueError, match="refusing"):
        load_bin(path)


def test_truncated_and_malformed_files(tmp_path, tiny_images):
    encoded = [_encoded(pixels, "PNG") for pixels in tiny_images]
    path = tmp_path / "good.bin"
    _write_bin(path, encoded, [True, False])
    data = path.read_bytes()
    for size in (0, 1, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.bin").write_bytes(data[:size])
        with pytest.raises(ValueError, match="cut.bin"):
            load_bin(tmp_path / "cut.bin")
    cases = {
        "not_pair.bin": (encoded,),
        "counts.bin": (encoded, [True]),
        "not_bytes.bin": ([1, 2], [True]),
        "not_bool.bin": (encoded, [3, 0]),
    }
    for name, content in cases.items():
        with open(tmp_path / name, "wb") as handle:
            pickle.dump(content, handle)
        with pytest.raises(ValueError, match=name):
            load_bin(tmp_path / name)
    _write_bin(tmp_path / "junk.bin", [b"not an image", encoded[1]], [True])
    with pytest.raises(ValueError, match="image 0"):
        load_bin(tmp_path / "junk.bin")
    _write_bin(
        tmp_path / "sizes.bin", [encoded[0], _encoded(np.zeros((4, 4, 3), np.uint8), "PNG")], [True]
    )
    with pytest.raises(ValueError, match="image_size"):
        load_bin(tmp_path / "sizes.bin")


def test_ijb_meta_readers(tmp_path):
    (tmp_path / "tid_mid.txt").write_text("1.jpg 5 10\n2.jpg 5 11\n\n3.jpg 6 12\n")
    names, templates, medias = read_template_media_list(tmp_path / "tid_mid.txt")
    assert names.tolist() == ["1.jpg", "2.jpg", "3.jpg"]
    assert templates.tolist() == [5, 5, 6] and medias.tolist() == [10, 11, 12]
    (tmp_path / "pairs.txt").write_text("5 6 0\n5 5 1\n")
    first, second, labels = read_template_pairs(tmp_path / "pairs.txt")
    assert (
        first.tolist() == [5, 5] and second.tolist() == [6, 5] and labels.tolist() == [False, True]
    )
    (tmp_path / "scores.txt").write_text(
        "1.jpg 1 2 3 4 5 6 7 8 9 10 0.98\n2.jpg 1 2 3 4 5 6 7 8 9 10 0.5\n"
    )
    names, scores = read_detector_scores(tmp_path / "scores.txt")
    assert names.tolist() == ["1.jpg", "2.jpg"] and scores.tolist() == [0.98, 0.5]


def test_ijb_meta_readers_reject_malformed(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("1.jpg 5\n")
    with pytest.raises(ValueError, match="3 fields"):
        read_template_media_list(bad)
    bad.write_text("1.jpg x 3\n")
    with pytest.raises(ValueError, match="integers"):
        read_template_media_list(bad)
    bad.write_text("5 6 2\n")
    with pytest.raises(ValueError, match="0 or 1"):
        read_template_pairs(bad)
    bad.write_text("5 6\n")
    with pytest.raises(ValueError, match="template_1"):
        read_template_pairs(bad)
    bad.write_text("5 six 1\n")
    with pytest.raises(ValueError, match="integers"):
        read_template_pairs(bad)
    bad.write_text("")
    with pytest.raises(ValueError, match="empty"):
        read_template_media_list(bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="empty template pair file"):
            read_template_pairs(bad)
    bad.write_text("a.jpg nan\n")
    with pytest.raises(ValueError, match="NaN"):
        read_detector_scores(bad)


# Hostile and unusual files, written opcode by opcode (see pickletools for the opcode names).
def _global(module, name):
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _binint(value):
    return pickle.BININT + struct.pack("<i", value)


def _short_bytes(data):
    return pickle.SHORT_BINBYTES + bytes([len(data)]) + data


def _pair_file(images_opcodes, issame_opcodes):
    """PROTO 3, then the tuple (images, issame) built by the given opcodes, then STOP."""
    return pickle.PROTO + b"\x03" + images_opcodes + issame_opcodes + pickle.TUPLE2 + pickle.STOP


def _array_without_data(num_elements):
    # numpy.core.multiarray._reconstruct(ndarray, (num_elements,), b"b"): allocated, never filled.
    return (
        _global("numpy.core.multiarray", "_reconstruct")
        + _global("numpy", "ndarray")
        + _binint(num_elements)
        + pickle.TUPLE1
        + _short_bytes(b"b")
        + pickle.TUPLE3
        + pickle.REDUCE
    )


def _assert_refused(path, data, reason):
    path.write_bytes(data)
    with pytest.raises(ValueError, match=f"{path.name}.*{reason}"):
        load_bin(path)


def test_an_array_without_its_data_is_refused_before_allocating(tmp_path):
    data = _pair_file(pickle.EMPTY_LIST, _array_without_data(500_000_000))
    assert len(data) < 128
    _assert_refused(tmp_path / "no_data.bin", data, "without its data")
    # The same array shape set by BUILD with no bytes behind it.
    build = (
        _array_without_data(0)[: -len(pickle.TUPLE1 + _short_bytes(b"b") + pickle.TUPLE3)]
        + pickle.TUPLE1
        + _short_bytes(b"b")
        + pickle.TUPLE3
        + pickle.REDUCE
    )
    state = (
        pickle.MARK
        + pickle.BININT1
        + b"\x01"
        + _binint(500_000_000)
        + pickle.TUPLE1
        + _global("numpy", "dtype")
        + pickle.SHORT_BINUNICODE
        + b"\x02b1"
        + pickle.NEWFALSE
        + pickle.NEWTRUE
        + pickle.TUPLE3
        + pickle.REDUCE
        + pickle.NEWFALSE
        + _short_bytes(b"")
        + pickle.TUPLE
        + pickle.BUILD
    )
    _assert_refused(
        tmp_path / "no_data_build.bin", _pair_file(pickle.EMPTY_LIST, build + state), ""
    )


def test_counts_are_checked_before_the_values(tmp_path):
    # 1 image for 3 pairs, with issame values that are not even booleans.
    data = _pair_file(
        pickle.EMPTY_LIST + _short_bytes(b"x") + pickle.APPEND,
        pickle.EMPTY_LIST + pickle.MARK + _binint(7) + _binint(8) + _binint(9) + pickle.APPENDS,
    )
    _assert_refused(tmp_path / "counts.bin", data, "1 images for 3 pairs")


_HOSTILE_SCANS = [
    # A BINBYTES8 length of 2**40: the unpickler would allocate it before reading.
    ("bytes8.bin", pickle.BINBYTES8 + struct.pack("<Q", 2**40) + b"xyz", "only"),
    ("bytes4.bin", pickle.BINBYTES + struct.pack("<I", 2**31) + b"xyz", "only"),
    ("unicode8.bin", pickle.BINUNICODE8 + struct.pack("<Q", 2**62), "only"),
    # A memo index of 2**31: the unpickler would size its memo table to 2**32 entries.
    (
        "memo.bin",
        pickle.EMPTY_LIST + pickle.LONG_BINPUT + struct.pack("<I", 2**31),
        "memo index",
    ),
    ("memo_get.bin", pickle.BINGET + b"\x05", "memo index"),
    ("frame.bin", pickle.FRAME + struct.pack("<Q", 2**40), "frame"),
    ("dict.bin", pickle.EMPTY_DICT, "EMPTY_DICT"),
    ("persistent.bin", pickle.BINPERSID, "BINPERSID"),
    ("unknown_opcode.bin", b"\xff", "opcode"),
    # A string of 1 four-byte character among ASCII would be stored at 4 bytes a character.
    ("wide_text.bin", pickle.SHORT_BINUNICODE + b"\x05" + "ab😀".encode(), "latin1"),
    ("no_stop.bin", pickle.EMPTY_LIST, "STOP"),
    ("long_global.bin", b"c" + b"x" * 10_000, "GLOBAL"),
]


@pytest.mark.parametrize(
    ("name", "payload", "reason"), _HOSTILE_SCANS, ids=[case[0] for case in _HOSTILE_SCANS]
)
def test_hostile_opcodes_are_refused_by_the_scan(tmp_path, name, payload, reason):
    _assert_refused(tmp_path / name, pickle.PROTO + b"\x04" + payload, reason)


def test_unknown_codec_and_too_many_opcodes(tmp_path, monkeypatch):
    codec = (
        _global("_codecs", "encode")
        + pickle.SHORT_BINUNICODE
        + b"\x01b"
        + pickle.SHORT_BINUNICODE
        + b"\x0cno-such-code"
        + pickle.TUPLE2
        + pickle.REDUCE
    )
    _assert_refused(
        tmp_path / "codec.bin", _pair_file(pickle.EMPTY_LIST, codec), "refusing to encode"
    )
    monkeypatch.setattr(face, "MAX_PICKLE_OPCODES", 50)
    many = pickle.EMPTY_LIST + pickle.MARK + pickle.NEWTRUE * 60 + pickle.APPENDS
    _assert_refused(tmp_path / "many.bin", _pair_file(pickle.EMPTY_LIST, many), "more than 50")


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("dtype", [">i4", "<i8", ">u2", "?"])
def test_numpy_issame_arrays_of_any_byte_order_are_accepted(tmp_path, tiny_images, protocol, dtype):
    encoded = [_encoded(pixels, "PNG") for pixels in tiny_images]
    path = tmp_path / "array.bin"
    _write_bin(path, encoded, np.array([1, 0], dtype=dtype), protocol)
    assert read_bin_pairs(path)[1].tolist() == [True, False]
    assert np.dtype(dtype.replace(">", "<")).byteorder in "=|"  # numpy's own dtypes unchanged


def _png_header_only(width, height):
    """A PNG whose header declares width x height pixels (no pixel data)."""

    def chunk(kind, body):
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_huge_images_are_refused_by_the_pixel_limit(tmp_path, tiny_images):
    small = _encoded(tiny_images[0], "PNG")
    path = tmp_path / "bomb.bin"
    # 14000 x 14000: Pillow itself raises DecompressionBombError on it.
    _write_bin(path, [small, _png_header_only(14000, 14000)], [True])
    with pytest.raises(ValueError, match="bomb.bin: image 1 is more than max_image_pixels"):
        load_bin(path)
    _write_bin(path, [small, _png_header_only(2049, 2048)], [True])
    with pytest.raises(ValueError, match="max_image_pixels=4194304"):
        load_bin(path)
    with pytest.raises(ValueError, match="image 0 is 5 x 6 pixels"):
        load_bin(path, max_image_pixels=29)
    # Within a raised limit the header passes and decoding is tried (this one has no pixels).
    with pytest.raises(ValueError, match="image 1 cannot be decoded"):
        load_bin(path, max_image_pixels=2049 * 2048)
    with pytest.raises(ValueError, match="max_image_pixels must be a positive integer"):
        load_bin(path, max_image_pixels=0)
