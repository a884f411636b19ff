"""Every renamed public name still works: it warns (``DeprecationWarning``) and gives the same result
as its new name; and README.md's changelog names each of them with its replacement."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from evaluation._deprecation import RENAMES, DeprecatedAlias, RenamedKeysDict, renamed_keywords
from evaluation.pml.verification_accuracy_calculator import VerificationAccuracyCalculator
from evaluation.reid import evaluate_reid_from_distances
from evaluation.verification import (
    RocCurve,
    identification_from_top_k,
    verification_accuracy_10fold,
    verification_report,
)
from evaluation.verification.ten_fold import fold_bounds

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def pairs():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200).astype(bool)
    scores = rng.normal(size=200) + labels
    return scores, labels


def warns_old_name(old: str):
    return pytest.warns(DeprecationWarning, match=rf"{re.escape(old)}.* is deprecated: use ")


@pytest.mark.parametrize("old", ["n_genuine", "n_impostor"])
def test_verification_counts(pairs, old):
    report = verification_report(*pairs)
    curve = RocCurve.from_scores(*pairs)
    new = "num_" + old.removeprefix("n_")
    assert getattr(report, new) == getattr(curve, new) > 0
    with warns_old_name(f"VerificationReport.{old}"):
        assert getattr(report, old) == getattr(report, new)
    with warns_old_name(f"RocCurve.{old}"):
        assert getattr(curve, old) == getattr(curve, new)
    summary = report.as_dict()
    assert old not in summary and summary[new] == getattr(report, new)
    with warns_old_name(repr(old)):
        assert summary[old] == summary[new]


def identification():
    top_scores = np.array([[0.9, 0.2], [0.8, 0.1], [0.4, 0.3]])
    top_subjects = np.array([[1, 2], [9, 2], [2, 1]])
    return identification_from_top_k(top_scores, top_subjects, [1, 2, 7], [1, 2], ranks=(1, 2))


@pytest.mark.parametrize(("old", "value"), [("n_mated", 2), ("n_non_mated", 1)])
def test_identification_counts(old, value):
    result = identification()
    new = "num_" + old.removeprefix("n_")
    assert getattr(result, new) == value
    with warns_old_name(f"IdentificationResult.{old}"):
        assert getattr(result, old) == value
    summary = result.as_dict()
    assert old not in summary
    with warns_old_name(repr(old)):
        assert summary[old] == value


def test_ten_fold_keyword(pairs):
    scores, labels = pairs
    new = verification_accuracy_10fold(scores=scores, issame=labels, num_folds=4)
    with warns_old_name("verification_accuracy_10fold(n_folds=...)"):
        old = verification_accuracy_10fold(scores=scores, issame=labels, n_folds=4)
    assert len(old.fold_accuracies) == len(new.fold_accuracies) == 4
    assert old.as_dict() == new.as_dict()
    with pytest.raises(TypeError, match="both n_folds= .deprecated. and num_folds="):
        verification_accuracy_10fold(scores=scores, issame=labels, n_folds=4, num_folds=4)


def test_fold_bounds_keywords():
    with warns_old_name("fold_bounds(n_items=...)"), warns_old_name("fold_bounds(n_folds=...)"):
        old = fold_bounds(n_items=23, n_folds=10)
    np.testing.assert_array_equal(old, fold_bounds(num_items=23, num_folds=10))
    np.testing.assert_array_equal(old, fold_bounds(23, 10))


def test_verification_calculator_keyword_and_attribute():
    with warns_old_name("VerificationAccuracyCalculator(n_folds=...)"):
        calculator = VerificationAccuracyCalculator(n_folds=5, include=("verification_auc",))
    assert calculator.num_folds == 5
    with warns_old_name("VerificationAccuracyCalculator.n_folds"):
        assert calculator.n_folds == 5
    with warns_old_name("VerificationAccuracyCalculator.n_folds"):
        calculator.n_folds = 7
    assert calculator.num_folds == 7


def test_reid_to_dict():
    rng = np.random.default_rng(0)
    distances = rng.random((6, 12))
    result = evaluate_reid_from_distances(
        distances,
        np.arange(6) % 3,
        np.arange(12) % 3,
        np.zeros(6, dtype=int),
        np.ones(12, dtype=int),
        max_rank=5,
    )
    with warns_old_name("ReIDResult.to_dict"):
        old = result.to_dict()
    assert old == result.as_dict()


def test_the_shims():
    @renamed_keywords(old="new")
    def function(new: int = 0) -> int:
        return new

    with warns_old_name("function(old=...)"):
        assert function(old=3) == 3
    assert function(new=4) == 4

    class Holder:
        value = 1
        alias = DeprecatedAlias("value")

    assert isinstance(Holder.alias, DeprecatedAlias)
    with warns_old_name("Holder.alias"):
        assert Holder().alias == 1
    summary = RenamedKeysDict({"new": 1}, {"old": "new"})
    with pytest.raises(KeyError):
        summary["neither"]
    assert summary == {"new": 1} and list(summary) == ["new"]


def test_the_new_names_do_not_warn(pairs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        report = verification_report(*pairs)
        report.as_dict()["num_genuine"]
        verification_accuracy_10fold(scores=pairs[0], issame=pairs[1], num_folds=3)


def changelog() -> str:
    text = README.read_text()
    return text[text.index("## Changelog") :]


def test_every_deprecated_name_is_in_the_changelog():
    # The modules above are imported, so every shim of the library has recorded its rename.
    owners = {owner for owner, _, _ in RENAMES}
    assert {"VerificationReport", "RocCurve", "IdentificationResult", "ReIDResult"} <= owners
    # One changelog item (a bullet, over one or more lines) names the owner, the old and the new name.
    items = changelog().split("\n- ")
    missing = [
        f"{owner}: {old} → {new}"
        for owner, old, new in sorted(set(RENAMES))
        if owner not in {"function", "Holder", "test_the_shims.<locals>.function"}
        and not any(
            all(re.search(rf"\b{re.escape(word)}\b", item) for word in (owner, old, new))
            and "→" in item
            for item in items
        )
    ]
    assert not missing
