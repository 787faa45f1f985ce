"""MPI-IO: hints for reading, and collective writes at byte offsets of an existing file.

A write MPI-IO refuses (a full disk, a quota, a read-only file system, permissions) is a
StorageError naming the file, like every refused write of mpinn."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

import numpy as np
from mpi4py import MPI

from mpinn.base.files import storage_error
from mpinn.comm.world import Comm

ERRNO = {MPI.ERR_NO_SPACE: errno.ENOSPC, MPI.ERR_QUOTA: errno.EDQUOT,
         MPI.ERR_READ_ONLY: errno.EROFS, MPI.ERR_ACCESS: errno.EACCES,
         MPI.ERR_NO_SUCH_FILE: errno.ENOENT}


@contextlib.contextmanager
def refused_writes(path: str) -> Iterator[None]:
    """An MPI-IO error becomes a StorageError about path (the file being written)."""
    try:
        yield
    except MPI.Exception as exc:
        code = ERRNO.get(exc.Get_error_class(), errno.EIO)
        reason = exc.Get_error_string().strip() if code == errno.EIO else os.strerror(code)
        raise storage_error(OSError(code, reason), "write", path) from None


def io_hints(hints: dict[str, str]) -> MPI.Info:
    """An MPI_Info with MPI-IO hints (ROMIO's names; unknown hints are ignored by MPI)."""
    info = MPI.Info.Create()
    for key, value in hints.items():
        info.Set(key, value)
    return info


def open_for_writing(comm: Comm, tmp: str, path: str) -> MPI.File:
    """Collective: the existing file tmp (to become path) opened for writing by every rank."""
    with refused_writes(path):
        return MPI.File.Open(comm, tmp, MPI.MODE_WRONLY)


def write_at_all(fh: MPI.File, offset: int, buf: np.ndarray, path: str) -> None:
    """Collective MPI-IO write of buf's bytes at a byte offset (buf may be empty)."""
    with refused_writes(path):
        fh.Write_at_all(offset, buf)


def close_file(fh: MPI.File, path: str) -> None:
    """Collective."""
    with refused_writes(path):
        fh.Close()
