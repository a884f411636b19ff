"""Peak memory of ``load_bin`` on hostile and legitimate ``.bin`` files.

The target: a file of S bytes holding images that decode to D bytes costs at most
S + 1.2 D + 64 MB above what the process held before the call (for a hostile file D = 0,
as it fails before any image is decoded). Each case runs in a fresh process
(:mod:`benchmarks._harness`); the peak is the kernel's high-water mark (VmHWM, reset just before
the call) minus the resident set just before it, with torch, Pillow and numpy already imported.

Cases: ``no_data``, the 98-byte pickle describing a 5e8-element bool array without its data
(it reached 6.4 GB before the scan); ``bytes8``, a BINBYTES8 length of 2^40; ``memo``, a
memo index of 2^31 (the unpickler would size its memo table to 2^32 entries); ``codec``, a
protocol-2 byte string encoded with a codec name that does not exist; ``png_bomb``, a pair
file whose second image is a real 14000 x 14000 PNG (zeros, deflated); and legitimate
files of ``num_pairs`` pairs of 112 x 112 JPEG images written with pickle protocols 2 and 4.

Run: ``PYTHONPATH=. python benchmarks/bench_load_bin.py [--num-pairs 1500]``
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._harness import machine_description, measure_in_fresh_process, run_case_if_asked

MIB = 2**20
HOSTILE_CASES = ("no_data", "bytes8", "memo", "codec", "png_bomb")
IMAGE_SIDE = 112


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def hostile_bytes(case: str) -> bytes:
    if case == "no_data":
        array = (
            _global("numpy.core.multiarray", "_reconstruct")
            + _global("numpy", "ndarray")
            + pickle.BININT
            + struct.pack("<i", 500_000_000)
            + pickle.TUPLE1
            + pickle.SHORT_BINBYTES
            + b"\x01b"
            + pickle.TUPLE3
            + pickle.REDUCE
        )
        return pickle.PROTO + b"\x02" + pickle.EMPTY_LIST + array + pickle.TUPLE2 + pickle.STOP
    if case == "bytes8":
        return pickle.PROTO + b"\x04" + pickle.BINBYTES8 + struct.pack("<Q", 2**40) + b"x"
    if case == "memo":
        return (
            pickle.PROTO
            + b"\x04"
            + pickle.EMPTY_LIST
            + pickle.LONG_BINPUT
            + struct.pack("<I", 2**31)
        )
    if case == "codec":
        encode = (
            _global("_codecs", "encode")
            + pickle.SHORT_BINUNICODE
            + b"\x01b"
            + pickle.SHORT_BINUNICODE
            + b"\x0cno-such-code"
            + pickle.TUPLE2
            + pickle.REDUCE
        )
        return pickle.PROTO + b"\x02" + pickle.EMPTY_LIST + encode + pickle.TUPLE2 + pickle.STOP
    if case == "png_bomb":
        from PIL import Image

        images = []
        for side in (IMAGE_SIDE, 14_000):
            buffer = io.BytesIO()
            Image.new("L", (side, side)).save(buffer, format="PNG", optimize=True)
            images.append(buffer.getvalue())
        return pickle.dumps((images, [True]), protocol=4)
    raise ValueError(case)


def legitimate_bytes(num_pairs: int, protocol: int) -> bytes:
    """A pair file of smooth synthetic faces-sized JPEGs (seeded), as insightface writes them."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rows, columns = np.mgrid[0:IMAGE_SIDE, 0:IMAGE_SIDE]
    images = []
    for _ in range(2 * num_pairs):
        phase = rng.uniform(0, 2 * np.pi, 3)
        pixels = np.stack(
            [127 + 100 * np.sin(rows / 9 + columns / 13 + p) for p in phase], axis=-1
        ).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    issame = [bool(value) for value in rng.integers(0, 2, num_pairs)]
    return pickle.dumps((images, issame), protocol=protocol)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def run_case(path: str, decoded_bytes: int) -> dict:
    """In the child: load ``path`` once, report the peak above the resident set before."""
    import numpy  # noqa: F401
    import PIL.Image  # noqa: F401
    import torch  # noqa: F401

    from evaluation.datasets.face import load_bin

    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets the high-water mark (VmHWM) to the current resident set
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    try:
        images, _ = load_bin(path)
        outcome = f"loaded {tuple(images.shape)}"
    except ValueError as error:
        outcome = f"ValueError: {str(error).split(': ', 1)[1][:70]}"
    seconds = time.perf_counter() - start
    return {
        "extra_mib": (_status_kib("VmHWM") - before) / 1024,
        "seconds": seconds,
        "outcome": outcome,
        "decoded_bytes": decoded_bytes,
    }


def main() -> None:
    if run_case_if_asked(run_case):
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-pairs", type=int, default=1500)
    args = parser.parse_args()
    decoded_per_image = 3 * IMAGE_SIDE * IMAGE_SIDE * 4  # float32 RGB
    with tempfile.TemporaryDirectory() as directory:
        cases = [(name, hostile_bytes(name), 0) for name in HOSTILE_CASES]
        for protocol in (2, 4):
            cases.append(
                (
                    f"{args.num_pairs} pairs, protocol {protocol}",
                    legitimate_bytes(args.num_pairs, protocol),
                    2 * args.num_pairs * decoded_per_image,
                )
            )
        print(f"Machine: {machine_description()}\n")
        print(
            "| file | S (bytes) | D (MiB) | peak above before (MiB) | bound S + 1.2 D + 64 MB (MiB) | met | outcome | time |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for number, (name, data, decoded) in enumerate(cases):
            path = os.path.join(directory, f"case{number}.bin")
            with open(path, "wb") as handle:
                handle.write(data)
            result = measure_in_fresh_process(__file__, path=path, decoded_bytes=decoded)
            bound = (len(data) + 1.2 * decoded + 64e6) / MIB
            print(
                f"| {name} | {len(data):,} | {decoded / MIB:.1f} | {result['extra_mib']:.1f} | "
                f"{bound:.1f} | {'yes' if result['extra_mib'] <= bound else 'NO'} | "
                f"{result['outcome']} | {result['seconds'] * 1e3:.1f} ms |"
            )


if __name__ == "__main__":
    main()
