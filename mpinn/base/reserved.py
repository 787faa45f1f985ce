"""New HDF5 files, written with their space reserved first.

The datasets are allocated when they are created (so the file's size is known before
any data), the file is closed, its whole size is reserved on disk (posix_fallocate),
and only then is it filled. A full disk or quota is a StorageError before the first
row, never a failure deep inside HDF5 or a sparse file larger than the disk; any write
HDF5 fails is a StorageError naming the file too. The file is written under a
temporary name and renamed into place when complete (files.commit).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import h5py

from mpinn.base.errors import StorageError
from mpinn.base.files import commit, remove_quietly, reserve, storage_error, temp_path
from mpinn.base.hdf5 import NOT_HDF5, failure_reason


def allocated(group: h5py.Group, name: str, shape: tuple[int, ...], dtype: Any) -> h5py.Dataset:
    """A contiguous dataset whose storage is allocated now and never filled: fixed byte
    offsets, and a file whose final size is known before its data is written."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return group.create_dataset(name, shape, dtype, dcpl=dcpl)


def failed_errno(exc: BaseException) -> int | None:
    """The errno of a failed write: an OSError's, or the one HDF5 quotes in its message
    (h5py raises some as RuntimeError: '... errno = 28, error message = ...')."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    found = re.search(r"errno = (\d+)", str(exc))
    return int(found.group(1)) if found else None


@contextlib.contextmanager
def hdf5_write_errors(path: str) -> Iterator[None]:
    """A write HDF5 fails becomes a StorageError naming path (which a temporary file is
    being written for): with the errno's name and advice where HDF5 quotes one. Only
    around writes: a failed read of another file is that file's error (hdf5.hdf5_errors)."""
    try:
        yield
    except NOT_HDF5:
        raise
    except (OSError, RuntimeError) as exc:
        code = failed_errno(exc)
        if code is None:
            raise StorageError(f"cannot write {path}: {failure_reason(exc)}") from None
        raise storage_error(OSError(code, os.strerror(code)), "write", path) from None


def create_reserved(tmp: str, path: str, layout: Callable[[h5py.File], None]) -> None:
    """Create the HDF5 file tmp, which will become path: layout(file) creates its datasets
    (with `allocated`) and attributes; then the whole file is reserved on disk."""
    with hdf5_write_errors(path), h5py.File(tmp, "w") as f:
        layout(f)
    reserve(tmp, path)


@contextlib.contextmanager
def new_hdf5(path: str, layout: Callable[[h5py.File], None]) -> Iterator[h5py.File]:
    """The new HDF5 file for path, created by layout() and reserved (create_reserved), open
    for filling; when the block ends it replaces path atomically. On any error path is
    untouched and the temporary file removed. The block runs under hdf5_write_errors:
    a read of another file in it needs its own hdf5_errors, inside the block, or its
    failure would be reported as this file's."""
    tmp = temp_path(path)
    try:
        create_reserved(tmp, path, layout)
        with hdf5_write_errors(path), h5py.File(tmp, "r+") as f:
            yield f
        commit(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
