"""Face verification: the functional core's public names in one place.

- 1:1 metrics over scored pairs (:mod:`evaluation.verification.pair_metrics`): :func:`roc`, :func:`auc`,
  :func:`eer`, :func:`tar_at_far`, :func:`verification_report`, and :class:`RocCurve` (one sort
  shared by all of them).
- The 10-fold protocol of LFW-style pair sets (:mod:`evaluation.verification.ten_fold`):
  :func:`verification_accuracy_10fold`, :func:`fuse_flip`, :func:`pair_distances`.
- IJB-style templates (:mod:`evaluation.verification.templates`): :func:`image_features`,
  :func:`template_features`, :func:`template_pair_scores`.
- Open-set 1:N identification (:mod:`evaluation.verification.identification`), and with a
  gallery grown by distractors (:mod:`evaluation.verification.distractors`).
- Bootstrap confidence intervals (:mod:`evaluation.verification.bootstrap`, through
  ``verification_report(..., bootstrap=...)``).
- Files (:mod:`evaluation.datasets.face`): :func:`load_bin` and the IJB meta readers.
"""

from ..datasets.face import (
    load_bin,
    read_detector_scores,
    read_template_media_list,
    read_template_pairs,
)
from .bootstrap import VerificationIntervals, bootstrap_verification
from .distractors import (
    DistractorCurve,
    default_distractor_counts,
    identification_with_distractors,
)
from .identification import (
    IdentificationResult,
    identification_from_top_k,
    open_set_identification,
)
from .pair_metrics import (
    DEFAULT_FAR_TARGETS,
    TAR_AT_FAR_RULES,
    RocCurve,
    VerificationReport,
    auc,
    eer,
    roc,
    tar_at_far,
    verification_report,
)
from .templates import image_features, template_features, template_pair_scores
from .ten_fold import (
    TenFoldResult,
    fuse_flip,
    pair_distances,
    verification_accuracy_10fold,
)

__all__ = [
    "DEFAULT_FAR_TARGETS",
    "TAR_AT_FAR_RULES",
    "DistractorCurve",
    "IdentificationResult",
    "RocCurve",
    "TenFoldResult",
    "VerificationIntervals",
    "VerificationReport",
    "auc",
    "bootstrap_verification",
    "default_distractor_counts",
    "eer",
    "fuse_flip",
    "identification_from_top_k",
    "identification_with_distractors",
    "image_features",
    "load_bin",
    "open_set_identification",
    "pair_distances",
    "read_detector_scores",
    "read_template_media_list",
    "read_template_pairs",
    "roc",
    "tar_at_far",
    "template_features",
    "template_pair_scores",
    "verification_accuracy_10fold",
    "verification_report",
]
