"""Defaults and named choices that several evaluators (and the command line) share, each
defined here only.

Plain Python without numpy, so that ``pml-lm ... --help`` states them without importing the
evaluators. The evaluators' modules re-export the choices under their usual names
(``evaluation.reid.PROTOCOLS``, ...).
"""

from __future__ import annotations

__all__ = [
    "CONVENTIONS",
    "DEFAULT_CONFIDENCE",
    "DEFAULT_FAR_TARGETS",
    "DEFAULT_FPIR_TARGETS",
    "DEFAULT_MAX_RANK",
    "DEFAULT_NUM_FOLDS",
    "DEFAULT_NUM_REPEATS",
    "DEFAULT_NUM_RESAMPLES",
    "DEFAULT_PROTOCOL",
    "DEFAULT_RANKS",
    "DEFAULT_REID_METRIC",
    "DEFAULT_SEED",
    "METRICS",
    "NAMED_EXPANSIONS",
    "PROTOCOLS",
]

#: Rank-k rates reported by 1:N identification, the distractor curve and the PML re-ID calculator.
DEFAULT_RANKS = (1, 5, 10)
#: Distances of the re-ID evaluators.
METRICS = ("euclidean", "cosine")
#: Re-ID protocols (docs/theory.md §5).
PROTOCOLS = ("market1501", "cuhk03")
#: Conventions of k-reciprocal re-ranking (see :mod:`evaluation.reid.rerank`).
CONVENTIONS = ("paper", "torchreid")
#: Named query expansions (see :mod:`evaluation.reid.query_expansion`).
NAMED_EXPANSIONS = ("average", "alpha")
#: Distance of the re-ID evaluators (squared euclidean; ``"cosine"`` the other choice).
DEFAULT_REID_METRIC = "euclidean"
#: Re-ID protocol (``"market1501"`` also serves DukeMTMC and MSMT17).
DEFAULT_PROTOCOL = "market1501"
#: Length of the CMC curve of the re-ID evaluators.
DEFAULT_MAX_RANK = 50
#: Repeats of the CUHK03 single-shot sampling.
DEFAULT_NUM_REPEATS = 10
#: FAR targets of TAR@FAR.
DEFAULT_FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
#: FPIR targets of open-set identification.
DEFAULT_FPIR_TARGETS = (1e-2, 1e-1)
#: Folds of the LFW-style k-fold protocol.
DEFAULT_NUM_FOLDS = 10
#: Seed of the CUHK03 sampling and of the bootstraps.
DEFAULT_SEED = 0
#: Resamples and confidence level of the percentile bootstraps.
DEFAULT_NUM_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95
