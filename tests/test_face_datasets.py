import io
import os
import pickle
import warnings

import numpy as np
import pytest

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
