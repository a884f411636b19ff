import numpy as np
import pytest

from evaluation.datasets.reid import read_dukemtmc_reid, read_market1501, read_msmt17


def touch(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def test_market1501_layout(tmp_path):
    touch(tmp_path / "bounding_box_train", ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg"])
    touch(tmp_path / "query", ["0001_c1s1_001051_00.jpg", "0003_c6s2_000001_00.jpg"])
    touch(
        tmp_path / "bounding_box_test",
        [
            "-1_c3s1_000551_01.jpg",  # junk: dropped
            "0000_c2s1_000101_01.jpg",  # distractor: kept
            "0001_c2s1_000001_01.jpg",
            "0003_c5s3_065187_02.jpg",
            "Thumbs.db",  # not an image: ignored
        ],
    )
    splits = read_market1501(tmp_path)
    gallery = splits["gallery"]
    assert [p.rsplit("/", 1)[1] for p in gallery.paths] == [
        "0000_c2s1_000101_01.jpg",
        "0001_c2s1_000001_01.jpg",
        "0003_c5s3_065187_02.jpg",
    ]
    np.testing.assert_array_equal(gallery.pids, [0, 1, 3])
    np.testing.assert_array_equal(gallery.camids, [1, 1, 4])
    np.testing.assert_array_equal(splits["query"].camids, [0, 5])
    assert len(splits["train"]) == 2


def test_dukemtmc_names(tmp_path):
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        touch(tmp_path / folder, ["0005_c2_f0046985.jpg", "0012_c8_f0153020.jpg"])
    splits = read_dukemtmc_reid(tmp_path)
    np.testing.assert_array_equal(splits["query"].pids, [5, 12])
    np.testing.assert_array_equal(splits["query"].camids, [1, 7])


def test_market1501_bad_layouts(tmp_path):
    with pytest.raises(NotADirectoryError):
        read_market1501(tmp_path / "missing")
    touch(tmp_path / "bounding_box_train", ["0001_c1s1_000001_00.jpg"])
    with pytest.raises(NotADirectoryError, match="query"):
        read_market1501(tmp_path)
    touch(tmp_path / "query", ["person.jpg"])
    touch(tmp_path / "bounding_box_test", [])
    with pytest.raises(ValueError, match="person.jpg"):
        read_market1501(tmp_path)


def write_msmt17(root, test_dir="test"):
    (root / "train").mkdir(parents=True)
    (root / test_dir).mkdir()
    (root / "list_train.txt").write_text("0000/0000_000_01_0303morning_0015_0.jpg 0\n")
    (root / "list_query.txt").write_text(
        "0000/0000_000_01_0303morning_0015_0.jpg 0\n0001/0001_004_15_0303afternoon_0127_1.jpg 1\n\n"
    )
    (root / "list_gallery.txt").write_text(
        "0000/0000_001_07_0303morning_0019_1.jpg 0\n0002/0002_010_03_0303noon_0001_0.jpg 2\n"
    )


@pytest.mark.parametrize("test_dir", ["test", "mask_test_v2"])
def test_msmt17_lists(tmp_path, test_dir):
    write_msmt17(tmp_path, test_dir)
    splits = read_msmt17(tmp_path)
    np.testing.assert_array_equal(splits["query"].pids, [0, 1])
    np.testing.assert_array_equal(splits["query"].camids, [0, 14])
    np.testing.assert_array_equal(splits["gallery"].camids, [6, 2])
    assert splits["gallery"].paths[1] == str(
        tmp_path / test_dir / "0002/0002_010_03_0303noon_0001_0.jpg"
    )
    assert len(splits["train"]) == 1


def test_msmt17_hostile_lines(tmp_path):
    write_msmt17(tmp_path)
    (tmp_path / "list_gallery.txt").write_text("0000/0000_001_07_x.jpg 0\nnot-a-line\n")
    with pytest.raises(ValueError, match="list_gallery.txt:2"):
        read_msmt17(tmp_path)
    (tmp_path / "list_gallery.txt").write_text("0000/0000_001_xx_x.jpg 0\n")
    with pytest.raises(ValueError, match="list_gallery.txt:1"):
        read_msmt17(tmp_path)
