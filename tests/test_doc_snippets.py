"""Every ```python block of README.md and docs/*.md runs as written.

The blocks use the names a reader has at hand (``model``, ``images``, ``labels``, features,
scores, ...): tiny stand-ins for them are defined here, never in the docs. A block that cannot
run in one process (it needs ``torchrun``, say) starts with the comment
``# doc-test: skip (reason)``; at most ``MAX_SKIPPED`` blocks may.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
SKIP = re.compile(r"^# doc-test: skip \((.+)\)$", re.M)
MAX_SKIPPED = 3
NUM_CLASSES, EMBEDDING_SIZE = 10, 32


def _blocks() -> list[tuple[str, str]]:
    found = []
    for document in DOCUMENTS:
        text = document.read_text()
        for match in BLOCK.finditer(text):
            line = text[: match.start()].count("\n") + 1
            found.append((f"{document.relative_to(ROOT)}:{line}", match.group(1)))
    return found


BLOCKS = _blocks()


def _write_lfw_bin(path: Path, num_pairs: int) -> None:
    """An insightface-style ``.bin`` (JPEG bytes, issame list) of random 112 x 112 faces."""
    image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(2 * num_pairs):
        buffer = io.BytesIO()
        pixels = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
        image.fromarray(pixels).save(buffer, format="JPEG")
        encoded.append(buffer.getvalue())
    issame = [bool(i % 2) for i in range(num_pairs)]
    path.write_bytes(pickle.dumps((encoded, issame)))


def _miner():
    from pytorch_metric_learning import miners

    return miners.MultiSimilarityMiner()


def _stand_ins(code: str) -> dict:
    """The names the docs assume: a model on 112 x 112 images, a labelled batch, re-ID
    features, verification pairs, a loader; files the blocks open are written to the cwd."""
    generator = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    model = torch.nn.Sequential(
        torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(12, EMBEDDING_SIZE)
    )
    images = torch.rand(40, 3, 112, 112, generator=generator)
    labels = torch.arange(40) % NUM_CLASSES
    embeddings = torch.randn(40, EMBEDDING_SIZE, generator=generator)
    num_query, num_gallery = 12, 40
    q_pids, g_pids = rng.integers(0, 6, num_query), rng.integers(0, 6, num_gallery)
    q_camids, g_camids = np.zeros(num_query, dtype=int), rng.integers(0, 3, num_gallery)
    num_pairs = 300
    pair_labels = rng.random(num_pairs) < 0.3
    names = {
        "torch": torch,
        "np": np,
        "model": model,
        "backbone": model,
        "images": images,
        "labels": labels,
        "num_classes": NUM_CLASSES,
        "embedding_size": EMBEDDING_SIZE,
        "C": NUM_CLASSES,
        "d": EMBEDDING_SIZE,
        "embeddings": embeddings,
        "issame": rng.random(20) < 0.5,  # the 20 interleaved pairs of ``embeddings``
        "flipped": embeddings + 0.01 * torch.randn(40, EMBEDDING_SIZE, generator=generator),
        "q_feats": rng.normal(size=(num_query, EMBEDDING_SIZE)).astype(np.float32),
        "g_feats": rng.normal(size=(num_gallery, EMBEDDING_SIZE)).astype(np.float32),
        "q_pids": q_pids,
        "g_pids": g_pids,
        "q_camids": q_camids,
        "g_camids": g_camids,
        "ids": (q_pids, g_pids, q_camids, g_camids),
        "distmat": rng.random((num_query, num_gallery)),
        "scores": rng.normal(size=num_pairs) + pair_labels,
        "pair_subjects": rng.integers(0, 30, num_pairs),
        "probe_features": rng.normal(size=(20, EMBEDDING_SIZE)).astype(np.float32),
        "probe_subjects": np.arange(20),
        "gallery_features": rng.normal(size=(20, EMBEDDING_SIZE)).astype(np.float32),
        "gallery_subjects": np.arange(20),
        "ddp_model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.01),
        "miner": _miner(),
        "old_world_size": 1,
        "epochs": 2,
        "loader": [(images[:20], labels[:20]), (images[20:], labels[20:])],
    }
    if "verification_report(scores, labels" in code:
        # Verification examples call the pair labels ``labels``, as insightface does.
        names["labels"] = pair_labels
    if "lfw.bin" in code:
        _write_lfw_bin(Path("lfw.bin"), num_pairs=10)
    if "megaface_distractors.npy" in code:
        np.save("megaface_distractors.npy", rng.normal(size=(50, EMBEDDING_SIZE)).astype("f4"))
    return names


def test_few_blocks_are_skipped():
    skipped = [where for where, code in BLOCKS if SKIP.search(code)]
    assert len(BLOCKS) >= 15
    assert len(skipped) <= MAX_SKIPPED, skipped


@pytest.fixture
def world_of_one(tmp_path, monkeypatch):
    """A gloo process group of one rank, as ``torchrun --nproc_per_node=1`` would give; the
    docs' own ``init_process_group`` call then finds it ready."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    monkeypatch.setattr(dist, "init_process_group", lambda *args, **kwargs: None)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_blocks_run(document, tmp_path, monkeypatch, request):
    """The document's blocks in order, as a reader runs them: a later block may use what an
    earlier one defined."""
    where_prefix = str(document.relative_to(ROOT))
    blocks = [(where, code) for where, code in BLOCKS if where.startswith(where_prefix + ":")]
    if any("ClassParallel" in code or "dist." in code for _, code in blocks):
        request.getfixturevalue("world_of_one")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for where, code in blocks:
        if SKIP.search(code):
            continue
        namespace = {**_stand_ins(code), **namespace} if namespace else _stand_ins(code)
        class_labels = namespace["labels"]
        pair_block = "verification_report(scores, labels" in code
        if pair_block:
            namespace["labels"] = _stand_ins(code)["labels"]
        try:
            exec(compile(code, where, "exec"), namespace)  # noqa: S102 -- the docs' own code
        except Exception as error:
            raise AssertionError(f"{where}: {type(error).__name__}: {error}") from error
        if pair_block:  # the next block means class labels again
            namespace["labels"] = class_labels
