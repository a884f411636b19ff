"""Bootstrap confidence intervals of 1:1 verification metrics (docs/theory.md §10).

Two resampling units:

- **pairs** (no subject ids): genuine and impostor pairs are resampled separately, each class
  drawn uniformly with replacement to its own size (a stratified bootstrap: the class sizes,
  hence the FAR grid, stay those of the data);
- **subjects** (``subjects`` gives one subject id per pair, e.g. that of its first image):
  subjects are drawn uniformly with replacement, as many as there are, and every pair of a
  subject drawn ``c`` times counts ``c`` times (Bolle et al.'s "subsets bootstrap"). This keeps
  the pairs of one person together, which pair resampling wrongly treats as independent.

Both give integer multiplicities of the pairs, so each resample is the metric of a multiset of
pairs, computed exactly: the scores are sorted once, each run of equal scores is one ROC point,
and a resample only needs the weighted genuine and impostor counts per run (runs without a
genuine pair merged, see :class:`_ScoreBlocks`), their cumulative sums (one compiled pass,
:mod:`evaluation.verification._bootstrap_kernel`), and the same rules as :mod:`evaluation.verification.pair_metrics`
(AUC as the Mann–Whitney statistic with ties counting one half, EER by linear interpolation,
TAR@FAR by the "threshold" rule). Intervals are percentile intervals
(``numpy.percentile``, linear interpolation); a subject resample without genuine or without
impostor pairs has undefined metrics and is left out (``num_degenerate`` counts them).

TAR@FAR by the "nearest" rule gets no interval: it reads the point nearest the target FAR on
the curve thinned by ``roc_curve(drop_intermediate=True)``, and which points survive the
thinning depends on whether neighbouring runs of impostor scores happen to carry equal
multiplicities; across resamples that makes the rule jump between the two ends of a step of
the ROC, so its spread measures the thinning rather than the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..defaults import DEFAULT_CONFIDENCE, DEFAULT_NUM_RESAMPLES, DEFAULT_SEED
from ..reid.bootstrap import check_resampling, percentile_interval
from ..validation import ArrayLike, check_ids
from ._bootstrap_kernel import count_subject_draws, resample_metrics

# FAR grid of the TAR band drawn on ROC figures.
BAND_POINTS = 60


@dataclass(frozen=True)
class VerificationIntervals:
    """Percentile bootstrap intervals of a verification report (see the module docstring)."""

    unit: str
    confidence: float
    num_resamples: int
    seed: int
    num_degenerate: int
    auc: tuple[float, float]
    eer: tuple[float, float]
    far_targets: np.ndarray
    tar_at_far_threshold: tuple[np.ndarray, np.ndarray]
    band_far: np.ndarray
    band_tar: tuple[np.ndarray, np.ndarray]

    def as_dict(self) -> dict:
        return {
            "method": f"percentile bootstrap over {self.unit}",
            "confidence": self.confidence,
            "num_resamples": self.num_resamples,
            "seed": self.seed,
            "num_degenerate": self.num_degenerate,
            "auc": list(self.auc),
            "eer": list(self.eer),
            "tar_at_far": [
                {
                    "far": float(far),
                    "threshold": [
                        float(self.tar_at_far_threshold[0][i]),
                        float(self.tar_at_far_threshold[1][i]),
                    ],
                }
                for i, far in enumerate(self.far_targets)
            ],
        }


@dataclass(frozen=True)
class _ScoreBlocks:
    """Scores sorted once, descending, cut into blocks: each run of equal scores that holds a
    genuine pair is a block, and so is each maximal stretch of impostor-only runs.

    Merging impostor-only runs changes no metric of any resample: such runs keep no genuine
    pair in any resample, so they only move the FAR along one horizontal stretch of the ROC,
    which adds nothing to the AUC, holds one TAR for the threshold rule, and
    keeps the EER on the same segment. With few genuine pairs the blocks are few (at most
    ``2 num_genuine + 1``), which is what makes a resample cheap.
    """

    genuine_blocks: np.ndarray  # block of each genuine pair
    impostor_blocks: np.ndarray  # block of each impostor pair
    genuine_sizes: np.ndarray  # genuine pairs per block
    impostor_sizes: np.ndarray
    genuine_pairs: np.ndarray  # pair index of each genuine pair (input order)
    impostor_pairs: np.ndarray

    @property
    def num_blocks(self) -> int:
        return len(self.genuine_sizes)

    @classmethod
    def from_pairs(cls, scores: np.ndarray, labels: np.ndarray) -> _ScoreBlocks:
        order = np.argsort(-scores.astype(np.float64), kind="stable")
        ordered = scores[order]
        run_starts = np.r_[True, ordered[1:] != ordered[:-1]]
        run_of_position = np.cumsum(run_starts) - 1
        run_has_genuine = np.bincount(run_of_position, labels[order]) > 0
        block_starts = run_has_genuine | np.r_[True, run_has_genuine[:-1]]
        block_of_run = np.cumsum(block_starts) - 1
        block_of_pair = np.empty(len(scores), dtype=np.int64)
        block_of_pair[order] = block_of_run[run_of_position]
        genuine_pairs, impostor_pairs = np.flatnonzero(labels), np.flatnonzero(~labels)
        num_blocks = int(block_of_run[-1]) + 1
        genuine_blocks, impostor_blocks = (
            block_of_pair[genuine_pairs],
            block_of_pair[impostor_pairs],
        )
        return cls(
            genuine_blocks,
            impostor_blocks,
            np.bincount(genuine_blocks, minlength=num_blocks),
            np.bincount(impostor_blocks, minlength=num_blocks),
            genuine_pairs,
            impostor_pairs,
        )


def weighted_metrics(
    genuine_counts: np.ndarray,
    impostor_counts: np.ndarray,
    far_targets: np.ndarray,
    band_far: np.ndarray,
) -> np.ndarray | None:
    """AUC, EER, TAR@FAR (threshold rule) and the TAR band of the multiset of
    pairs with the given genuine and impostor multiplicities per block (or per run of equal
    scores; descending score), as one vector; None when one class is empty."""
    from ._bootstrap_kernel import resample_metrics

    num_runs = len(genuine_counts)
    out = np.empty(2 + len(far_targets) + len(band_far))
    buffers = np.empty(num_runs, dtype=np.int64), np.empty(num_runs, dtype=np.int64)
    genuine, impostor = (np.asarray(c, dtype=np.int64) for c in (genuine_counts, impostor_counts))
    if not resample_metrics(genuine, impostor, far_targets, band_far, *buffers, out):
        return None
    return out


def bootstrap_verification(
    scores: np.ndarray,
    labels: np.ndarray,
    far_targets: np.ndarray,
    num_resamples: int = DEFAULT_NUM_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
    subjects: ArrayLike | None = None,
) -> VerificationIntervals:
    """Intervals of AUC, EER and TAR@FAR (threshold rule) of validated ``(scores, labels)``.

    ``subjects``: one integer subject id per pair to resample subjects; pairs otherwise.
    Seeded by ``numpy.random.default_rng(seed)``; per resample, pairs: the genuine then the
    impostor multiplicities per block of :class:`_ScoreBlocks`, each one ``rng.multinomial``
    draw of the class size over the blocks' shares of it (exactly the counts of drawing that
    many pairs of the class with replacement); subjects: ``rng.random(num_subjects)``, a uniform
    ``u`` picking subject ``floor(u·S)`` in ascending id order.

    Raises:
        ValueError: ``num_resamples``/``confidence`` out of range, ``subjects`` of the wrong
            length or type, or every subject resample degenerate.
    """
    num_resamples, confidence = check_resampling(num_resamples, confidence)
    blocks = _ScoreBlocks.from_pairs(scores, labels)
    num_blocks = blocks.num_blocks
    num_genuine, num_impostor = len(blocks.genuine_pairs), len(blocks.impostor_pairs)
    band_far = np.geomspace(1 / num_impostor, 1.0, BAND_POINTS)
    rng = np.random.default_rng(seed)
    # Buffers reused by every resample (see _bootstrap_kernel).
    genuine_counts = np.empty(num_blocks, dtype=np.int64)
    impostor_counts = np.empty(num_blocks, dtype=np.int64)
    cumulative = np.empty(num_blocks, dtype=np.int64), np.empty(num_blocks, dtype=np.int64)
    values = np.full((num_resamples, 2 + len(far_targets) + BAND_POINTS), np.nan)
    if subjects is None:
        genuine_shares = blocks.genuine_sizes / num_genuine
        impostor_shares = blocks.impostor_sizes / num_impostor
    else:
        subject_ids = check_ids(subjects, "subjects", len(scores))
        unique, subject_of_pair = np.unique(subject_ids, return_inverse=True)
        genuine_subjects = subject_of_pair[blocks.genuine_pairs]
        impostor_subjects = subject_of_pair[blocks.impostor_pairs]
        subject_uniforms = np.empty(len(unique))
        subject_counts = np.empty(len(unique), dtype=np.int64)
    for resample in range(num_resamples):
        if subjects is None:
            genuine_counts[:] = rng.multinomial(num_genuine, genuine_shares)
            impostor_counts[:] = rng.multinomial(num_impostor, impostor_shares)
        else:
            rng.random(out=subject_uniforms)
            for counts, items, item_blocks in (
                (genuine_counts, genuine_subjects, blocks.genuine_blocks),
                (impostor_counts, impostor_subjects, blocks.impostor_blocks),
            ):
                count_subject_draws(subject_uniforms, subject_counts, items, item_blocks, counts)
        resample_metrics(
            genuine_counts, impostor_counts, far_targets, band_far, *cumulative, values[resample]
        )
    kept = ~np.isnan(values[:, 0])
    if not kept.any():
        raise ValueError("every subject resample lacks genuine or impostor pairs")
    low, high = percentile_interval(values[kept], confidence)
    end = 2 + len(far_targets)
    return VerificationIntervals(
        unit="subjects" if subjects is not None else "pairs (stratified by label)",
        confidence=confidence,
        num_resamples=num_resamples,
        seed=seed,
        num_degenerate=int((~kept).sum()),
        auc=(float(low[0]), float(high[0])),
        eer=(float(low[1]), float(high[1])),
        far_targets=far_targets,
        tar_at_far_threshold=(low[2:end], high[2:end]),
        band_far=band_far,
        band_tar=(low[end:], high[end:]),
    )
