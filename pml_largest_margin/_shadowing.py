"""Detect a foreign ``evaluation`` package shadowing this distribution's own.

Re-ID and face repositories often have an ``evaluation/`` folder of their own; run from there,
``import evaluation`` finds it first (the working directory leads ``sys.path``) and this
package's evaluator fails with confusing import errors. Checked once, when
``pml_largest_margin`` is imported, without importing ``evaluation``.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

__all__ = ["EvaluationShadowedWarning", "shadowing_message", "warn_if_evaluation_shadowed"]

# This distribution installs both packages side by side (pyproject: packages.find).
OWN_EVALUATION = Path(__file__).resolve().parent.parent / "evaluation"


class EvaluationShadowedWarning(UserWarning):
    """``import evaluation`` resolves to a package other than the one shipped with this one."""


def _found_location() -> Path | None:
    module = sys.modules.get("evaluation")
    if module is not None:
        locations = list(getattr(module, "__path__", []) or [getattr(module, "__file__", "")])
    else:
        try:
            spec = importlib.util.find_spec("evaluation")
        except (ImportError, ValueError):
            return None
        if spec is None:
            return None
        locations = list(spec.submodule_search_locations or [spec.origin or ""])
    if not locations or not locations[0]:
        return None
    found = Path(locations[0]).resolve()
    return found.parent if found.suffix == ".py" else found


def shadowing_message() -> str | None:
    """One line saying where the foreign ``evaluation`` lives and how to avoid it, or ``None``
    when ``import evaluation`` finds this distribution's own package (or nothing)."""
    found = _found_location()
    if found is None or found == OWN_EVALUATION or not OWN_EVALUATION.is_dir():
        return None
    return (
        f"`import evaluation` finds {found}, not pml_largest_margin's evaluation package "
        f"({OWN_EVALUATION}); run from another directory or rename that folder"
    )


def warn_if_evaluation_shadowed() -> None:
    """Issue :class:`EvaluationShadowedWarning` (one line on stderr by default) when shadowed."""
    message = shadowing_message()
    if message is not None:
        # An explicit location with no source line keeps the default output to one line.
        warnings.warn_explicit(
            message, EvaluationShadowedWarning, filename="pml_largest_margin", lineno=0
        )
