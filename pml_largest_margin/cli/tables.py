"""The one number format of ``pml-lm``'s tables: rates in percent, the unit named in the header.

Tables print rates (accuracy, mAP, CMC, AUC, EER, TAR) as percentages with the ``%`` in the
column header, never in the cells; JSON files hold the same rates as fractions in [0, 1].
FAR targets keep the form they were asked in (``1e-3``), as in ``TAR@FAR=1e-3``.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["NOT_MEASURABLE", "markdown_table", "percent", "short_number"]

# The cell of a rate that the data cannot measure (the JSON says why).
NOT_MEASURABLE = "not measurable"


def percent(rate: float, decimals: int = 2, interval: Sequence[float] | None = None) -> str:
    """``rate`` (a fraction) in percent with ``decimals`` digits, and ``[low, high]`` after it
    when an interval (fractions too) is given."""
    text = f"{100 * rate:.{decimals}f}"
    if interval is not None:
        text += f" [{100 * interval[0]:.{decimals}f}, {100 * interval[1]:.{decimals}f}]"
    return text


def short_number(value: float) -> str:
    """``value`` as a person writes a target: ``1e-6``, ``2.5e-3`` below 1 (scientific, no
    padding zeros), ``%g`` otherwise; ``repr`` where that form would not read back exactly."""
    if 0 < abs(value) < 1:
        mantissa, _, exponent = f"{value:.15e}".partition("e")
        text = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    else:
        text = f"{value:g}"
    return text if float(text) == value else repr(float(value))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table (also readable in a terminal)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
