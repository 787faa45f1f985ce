"""Every MPI call mpinn makes: the world, reductions, broadcasts, agreement, abort.

Functions take the communicator explicitly so tests can pass COMM_SELF, a
Dup() of the world, or a counting wrapper. Arrays travel with the uppercase
buffer calls (in place where possible); only small control data (error
messages, metadata, configs) goes through the pickling lowercase calls.

Importing this module initialises MPI (mpi4py does so on import of MPI).
"""

from __future__ import annotations

import hashlib
import sys
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
from mpi4py import MPI

from .errors import CollectiveError, Interrupted, UsageError

EXIT_INTERRUPTED = 3  # stopped by a signal, checkpoint written: resume with --resume

Comm = MPI.Comm


def world() -> Comm:
    return MPI.COMM_WORLD


def library() -> str:
    """First line of the MPI library's version string, e.g. 'MPICH Version: 5.0.2'."""
    return " ".join(MPI.Get_library_version().splitlines()[0].split())


def thread_multiple() -> bool:
    """Whether MPI lets any thread make MPI calls at any time (MPI_THREAD_MULTIPLE)."""
    return MPI.Query_thread() == MPI.THREAD_MULTIPLE


def allreduce_sum(comm: Comm, buf: np.ndarray) -> None:
    """In place: buf <- sum over ranks of buf. Every rank must call it with the same shape."""
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)


def allreduce_max(comm: Comm, buf: np.ndarray) -> None:
    """In place: buf <- elementwise max over ranks of buf."""
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MAX)


def broadcast(comm: Comm, buf: np.ndarray, root: int = 0) -> None:
    """In place: every rank's buf <- root's buf."""
    comm.Bcast(buf, root=root)


def broadcast_object(comm: Comm, obj: Any, root: int = 0) -> Any:
    """Small control data only (configs, metadata): pickled."""
    return comm.bcast(obj, root=root)


def gather_objects(comm: Comm, obj: Any) -> list[Any]:
    """Small control data only: every rank gets the list of all ranks' obj."""
    return comm.allgather(obj)


def first_error(comm: Comm, message: str | None) -> str | None:
    """Collective: the message of the lowest rank that has one, on every rank.

    This is how ranks agree that input is bad before anything else is
    collective: each validates what it can see, then all learn whether anyone
    failed, so all exit together with the same message instead of hanging.
    """
    return next((m for m in gather_objects(comm, message) if m is not None), None)


def digest(buf: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(buf).tobytes(), digest_size=16).hexdigest()


def check_identical(comm: Comm, buf: np.ndarray, what: str) -> None:
    """Raise CollectiveError on every rank unless buf is bitwise equal on all ranks."""
    digests = gather_objects(comm, digest(buf))
    differing = [r for r, d in enumerate(digests) if d != digests[0]]
    if differing:
        raise CollectiveError(f"{what} differ between ranks: ranks {differing} "
                              f"disagree with rank 0")


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


def barrier(comm: Comm) -> None:
    comm.Barrier()


def print0(comm: Comm, *args: Any, file=None) -> None:
    """Print once, from rank 0, flushed (the one place ranks decide who logs)."""
    if comm.rank == 0:
        print(*args, file=file or sys.stdout, flush=True)


def run_or_abort(comm: Comm, body: Callable[[], int]) -> int:
    """Run body() on every rank; turn failures into the documented exit codes.

    UsageError is raised on every rank alike (first_error agreed on it) for bad
    usage or input: rank 0 prints the message once and all ranks return 2.
    CollectiveError is a run-time failure all ranks detected alike: printed once,
    all return 1. Any other exception may be on one rank only, with the others
    already waiting in a collective: this rank prints its traceback and aborts
    the whole job with exit code 1, so nothing hangs.
    """
    try:
        return body()
    except UsageError as exc:
        print0(comm, f"mpinn: error: {exc}", file=sys.stderr)
        return 2
    except CollectiveError as exc:
        print0(comm, f"mpinn: failed: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print0(comm, f"mpinn: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseException as exc:  # noqa: BLE001 - anything else must end all ranks
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            raise
        prefix = f"mpinn: rank {comm.rank} of {comm.size} failed"
        if isinstance(exc, KeyboardInterrupt):
            print(f"{prefix}: interrupted", file=sys.stderr, flush=True)
        else:
            text = traceback.format_exc()
            print(f"{prefix}:\n{text}", file=sys.stderr, flush=True, end="")
        if comm.size > 1:
            comm.Abort(1)
        return 1
