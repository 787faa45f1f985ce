"""Finiteness, checked in one pass: whether a float array holds a NaN or an infinity, and
the first row that does (what the readers check of every batch, and the checkpoint of
every array it writes)."""

from __future__ import annotations

import numpy as np


def all_finite(values: np.ndarray) -> bool:
    """Whether every value of a float array is finite: one pass, no temporary array.

    The sum of all values is finite whenever every value is; only if it is not
    (a NaN, an infinity, or an overflowing sum of finite values) is each value
    checked.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is an answer, not news
        return values.size == 0 or bool(np.isfinite(values.sum())) \
            or bool(np.isfinite(values).all())


def nonfinite_row(values: np.ndarray) -> int | None:
    """Position of the first row of a float array with a NaN or an infinity, or None.

    Checking each batch this way costs one pass over it (all_finite).
    """
    if all_finite(values):
        return None
    bad = np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))
    return int(bad[0]) if len(bad) else None
