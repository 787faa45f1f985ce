"""MPI-IO: hints for reading, and collective writes at byte offsets of an existing file."""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from mpinn.comm.world import Comm


def io_hints(hints: dict[str, str]) -> MPI.Info:
    """An MPI_Info with MPI-IO hints (ROMIO's names; unknown hints are ignored by MPI)."""
    info = MPI.Info.Create()
    for key, value in hints.items():
        info.Set(key, value)
    return info


def open_for_writing(comm: Comm, path: str) -> MPI.File:
    """Collective: an existing file opened for MPI-IO writing by every rank."""
    return MPI.File.Open(comm, path, MPI.MODE_WRONLY)


def write_at_all(fh: MPI.File, offset: int, buf: np.ndarray) -> None:
    """Collective MPI-IO write of buf's bytes at a byte offset (buf may be empty)."""
    fh.Write_at_all(offset, buf)


def close_file(fh: MPI.File) -> None:
    fh.Close()
