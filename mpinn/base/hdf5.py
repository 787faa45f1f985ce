"""HDF5 files opened for reading, or explained: a file HDF5 cannot open, or an object in
it that HDF5 fails to read (a corrupt file), is a UsageError naming the file, the object
and HDF5's reason, never HDF5's error dump.
(New files are written by reserved.py.)
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from typing import Any

import h5py

from mpinn.base.errors import CollectiveError, StorageError, UsageError

# What h5py raises when HDF5 fails to read a corrupt file: HDF5's errors map to
# OSError mostly, some to KeyError, ValueError, TypeError or RuntimeError; a
# corrupt size can ask for more memory than there is. (mpinn's own StorageError and
# CollectiveError are RuntimeErrors too: NOT_HDF5 lets them pass.)
HDF5_FAILURES = (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError, MemoryError)
NOT_HDF5 = (StorageError, CollectiveError)


def open_hdf5(path: str, what: str = "file", **kwargs: Any) -> h5py.File:
    """h5py.File(path, 'r') or a UsageError that says why not (never HDF5's error dump)."""
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory, not an HDF5 {what}")
    try:
        return h5py.File(path, "r", **kwargs)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such {what}") from None
    except HDF5_FAILURES as exc:
        raise UsageError(f"{path}: not a readable HDF5 {what} ({failure_reason(exc)})") from None


def open_hdf5_image(data: bytes) -> h5py.File:
    """An HDF5 file held in memory (the bytes of a file read once), opened read-only:
    nothing reads the disk again. (h5py reads a file object 4x faster here than
    HDF5's core driver opens a file image: 10 ms vs 43 ms for 15 MB.) OSError if HDF5
    cannot open it."""
    return h5py.File(io.BytesIO(data), "r")


def failure_reason(exc: BaseException) -> str:
    """HDF5's reason for a failed read, in a few words."""
    if isinstance(exc, MemoryError):
        return "it declares a size larger than this machine's memory"
    return str(exc).strip() or type(exc).__name__


@contextlib.contextmanager
def hdf5_errors(path: str, what: str) -> Iterator[None]:
    """Turn HDF5's failure to read `what` (an object, some rows) of the file at path into
    one UsageError naming both and HDF5's reason: bad input, not a traceback."""
    try:
        yield
    except NOT_HDF5:
        raise
    except HDF5_FAILURES as exc:
        raise UsageError(f"{path}: HDF5 cannot read {what} ({failure_reason(exc)}); the file "
                         f"is probably corrupt") from None

