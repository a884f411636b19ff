"""``device=`` replaces ``use_gpu=`` across evaluation; ``ranks=()`` is refused."""

import numpy as np
import pytest
import torch

from evaluation.knn import search_device, top_k
from evaluation.pml.reid_accuracy_calculator import ReIDAccuracyCalculator
from evaluation.reid.query_expansion import expand_queries
from evaluation.reid.rerank import KReciprocalOptions, k_reciprocal_rerank
from evaluation.reid.top_k import cmc_from_top_k, reranking_candidates
from evaluation.verification import identification_with_distractors, open_set_identification
from evaluation.verification.identification import identification_from_top_k


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        (None, None),
        ("cpu", "cpu"),
        (torch.device("cpu"), "cpu"),
        ("cuda", "cuda:0"),
        ("cuda:1", "cuda:1"),
        (torch.device("cuda", 2), "cuda:2"),
        ("meta", "cpu"),  # FAISS has CUDA indexes only: other torch devices search on the CPU
    ],
)
def test_search_device_reads_torch_devices(device, expected):
    assert search_device(device) == expected


def test_search_device_deprecated_forms_and_errors():
    for use_gpu, expected in ((True, "cuda:0"), (False, "cpu")):
        with pytest.warns(DeprecationWarning, match="use_gpu= is deprecated"):
            assert search_device(use_gpu=use_gpu) == expected
        # An old positional use_gpu lands in device.
        with pytest.warns(DeprecationWarning, match="use_gpu= is deprecated"):
            assert search_device(use_gpu) == expected
    with pytest.raises(TypeError, match="not both"):
        search_device("cpu", use_gpu=False)
    with pytest.raises(ValueError, match="device must be None or a torch device, got 'gpu'"):
        search_device("gpu")


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    query = rng.normal(size=(12, 6)).astype(np.float32)
    gallery = rng.normal(size=(40, 6)).astype(np.float32)
    pids = rng.integers(0, 4, 52)
    camids = rng.integers(0, 2, 52)
    return query, gallery, (pids[:12], pids[12:], camids[:12], camids[12:])


def _calls():
    """Each public function that took ``use_gpu=``, as ``call(**search_keyword)``."""
    query, gallery, ids = _problem()
    options = KReciprocalOptions(k1=4, k2=2)
    subjects = np.arange(12) % 5
    return {
        "top_k": lambda **kw: top_k(query, gallery, 3, "cosine", **kw),
        "cmc_from_top_k": lambda **kw: cmc_from_top_k(query, gallery, *ids, max_rank=5, **kw),
        "reranking_candidates": lambda **kw: reranking_candidates(query, gallery, 4, **kw),
        "expand_queries": lambda **kw: expand_queries(query, gallery, **kw),
        "open_set_identification": lambda **kw: (
            open_set_identification(
                query, subjects, gallery[:10], np.arange(10), ranks=(1, 3), **kw
            ).rank_rates
        ),
        "identification_with_distractors": lambda **kw: (
            identification_with_distractors(
                query, subjects, gallery[:10], np.arange(10), gallery[10:], ranks=(1, 2), **kw
            ).rates
        ),
        "k_reciprocal_rerank": lambda **kw: k_reciprocal_rerank(
            query, gallery, options=options, **kw
        ).dense(),
    }


@pytest.mark.parametrize("name", list(_calls()))
def test_use_gpu_still_works_with_a_deprecation_warning(name):
    call = _calls()[name]
    expected = call(device="cpu")
    with pytest.warns(DeprecationWarning, match="use_gpu= is deprecated") as caught:
        old = call(use_gpu=False)
    # The warning points at the caller (this file), not at the library.
    assert caught[0].filename == __file__
    if not isinstance(expected, tuple):
        old, expected = (old,), (expected,)
    for ours, reference in zip(old, expected, strict=True):
        np.testing.assert_array_equal(ours, reference)


def test_empty_ranks_are_refused():
    query, gallery, _ = _problem(1)
    subjects = np.arange(12) % 5
    with pytest.raises(ValueError, match="ranks must hold at least one rank"):
        open_set_identification(query, subjects, gallery[:10], np.arange(10), ranks=())
    with pytest.raises(ValueError, match="ranks must hold at least one rank"):
        identification_from_top_k(np.zeros((12, 3)), np.zeros((12, 3), int), subjects, [0], ())
    with pytest.raises(ValueError, match="ranks must hold at least one rank"):
        identification_with_distractors(
            query, subjects, gallery[:10], np.arange(10), gallery[10:], ranks=()
        )
    with pytest.raises(ValueError, match="ranks"):
        ReIDAccuracyCalculator(ranks=())
    for bad in ((0,), (1.5,), (True,), [[1, 2], [3, 4]]):
        with pytest.raises(ValueError, match="ranks"):
            open_set_identification(query, subjects, gallery[:10], np.arange(10), ranks=bad)
    result = open_set_identification(query, subjects, gallery[:10], np.arange(10), ranks=3)
    assert result.ranks == (3,)
