"""Reading fixed prototypes from a ``.npy`` file (``pml-lm prototypes`` writes them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def load_fixed_prototypes(path: str | Path, num_classes: int, embedding_size: int) -> torch.Tensor:
    """``W`` (embedding_size, num_classes), float32, from the 2-D float array in ``path``.

    The file holds PML's layout, one column per class. Columns need not be unit: the loss
    normalises them when they are frozen into it
    (:func:`~pml_largest_margin.prototypes.freeze_prototypes`).

    Raises:
        ValueError: the file cannot be read as a numpy array (missing, not ``.npy``, pickled
            objects), is not a 2-D float array, has the wrong shape (a transposed array gets its
            own message), holds NaN/Inf, or has a zero column.
    """
    path = Path(path)
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"cannot read prototypes file {path}: {error}") from error
    if not isinstance(array, np.ndarray):  # an .npz archive
        raise ValueError(f"prototypes file {path} holds several arrays; save one with np.save")
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(
            f"prototypes file {path} must hold a 2-D float array, got shape {array.shape} "
            f"and dtype {array.dtype}"
        )
    expected = (embedding_size, num_classes)
    if array.shape != expected:
        hint = ""
        if array.shape == expected[::-1]:
            hint = " (it looks transposed: save W.T, one column per class)"
        raise ValueError(
            f"prototypes file {path} has shape {array.shape} but training needs "
            f"(embedding_size, num_classes) = {expected}{hint}"
        )
    if not np.isfinite(array).all():
        raise ValueError(f"prototypes file {path} contains NaN or Inf")
    zero_columns = np.flatnonzero(np.linalg.norm(array, axis=0) == 0)
    if zero_columns.size:
        raise ValueError(
            f"prototypes file {path} has zero columns (classes {zero_columns[:5].tolist()}); "
            "their directions are undefined"
        )
    return torch.from_numpy(array.astype(np.float32))
