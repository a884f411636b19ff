"""matplotlib on demand (the ``plot`` extra), with the non-interactive Agg back end."""

from __future__ import annotations

from types import ModuleType


def pyplot() -> ModuleType:
    """``matplotlib.pyplot``, or a ``ValueError`` (one line for the CLI) naming the extra."""
    try:
        import matplotlib
    except ImportError as error:
        raise ValueError('figures need matplotlib: python3 -m pip install -e ".[plot]"') from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
