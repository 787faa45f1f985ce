"""Every MPI call mpinn makes: the world, the gradient sync, reductions, agreement, abort.

Functions take the communicator explicitly so tests can pass COMM_SELF, a
Dup() of the world, or a counting wrapper. Arrays travel with the uppercase
buffer calls (in place where possible); only small control data (error
messages, metadata, configs) goes through the pickling lowercase calls.

Importing this module initialises MPI (mpi4py does so on import of MPI).
"""

from __future__ import annotations

import hashlib
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from mpi4py import MPI

from .errors import CollectiveError, Interrupted, StorageError, UsageError

EXIT_INTERRUPTED = 3  # stopped by a signal, checkpoint written: resume with --resume

Comm = MPI.Comm
T = TypeVar("T")


def world() -> Comm:
    return MPI.COMM_WORLD


def library() -> str:
    """First line of the MPI library's version string, e.g. 'MPICH Version: 5.0.2'."""
    return " ".join(MPI.Get_library_version().splitlines()[0].split())


def thread_multiple() -> bool:
    """Whether MPI lets any thread make MPI calls at any time (MPI_THREAD_MULTIPLE)."""
    return MPI.Query_thread() == MPI.THREAD_MULTIPLE


class GradientSync:
    """The step's one Allreduce: all gradients, then a few control slots, in one buffer.

        buffer = [ grads (n_params) | loss | stop | bad input ]

    Before the call each rank writes the summed loss of its rows, whether it was
    asked to stop (a signal), and whether its rows held non-finite input. One
    in-place SUM then gives every rank the gradient summed over the global batch,
    the batch's summed loss, and how many ranks want to stop or met bad input:
    the ranks agree on all of it without a second collective, at the same step.
    The model's gradient vector is `grads`, a view (model.py stays free of MPI).
    """

    LOSS, STOP, BAD_INPUT = range(3)  # control slots, after the gradients

    def __init__(self, comm: Comm, n_params: int, dtype: np.dtype | str) -> None:
        self.comm = comm
        self.buffer = np.zeros(n_params + 3, dtype)
        self.grads = self.buffer[:n_params]
        self.control = self.buffer[n_params:]

    def allreduce(self, loss: float, stop: bool = False, bad_input: bool = False) -> None:
        """In place: gradients and control slots <- their sums over all ranks."""
        self.control[:] = (loss, stop, bad_input)
        self.comm.Allreduce(MPI.IN_PLACE, self.buffer, op=MPI.SUM)

    @property
    def stop_requested(self) -> bool:
        return bool(self.control[self.STOP] > 0)

    @property
    def bad_input(self) -> bool:
        return bool(self.control[self.BAD_INPUT] > 0)

    @property
    def loss(self) -> float:
        """The loss summed over the global batch (after allreduce)."""
        return float(self.control[self.LOSS])

    def finite(self) -> bool:
        """Whether the reduced loss and every reduced gradient are finite.

        A NaN or inf on any rank makes the sums NaN or inf on all ranks, so all
        ranks reach the same verdict. The dot product reads the gradient once and
        allocates nothing (|g|^2 overflows only for gradients beyond ~1e19 in
        float32, ~1e154 in float64: divergence by any measure).
        """
        return bool(np.isfinite(self.control[self.LOSS])
                    and np.isfinite(np.dot(self.grads, self.grads)))


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


def root_tries(comm: Comm, action: Callable[[], T]) -> T | None:
    """Collective: rank 0 runs action(); all ranks learn if it failed and raise alike.

    A UsageError on rank 0 becomes a UsageError on every rank (exit 2), a
    StorageError or CollectiveError a CollectiveError (exit 1), so a refused write or a bad file
    that only rank 0 touches ends every rank cleanly instead of leaving the
    others waiting. Returns action()'s result on rank 0, None elsewhere. Costs
    one small broadcast; anything else raised on rank 0 is a bug and aborts.
    """
    result, failure = None, None
    if comm.rank == 0:
        try:
            result = action()
        except UsageError as exc:
            failure = ("usage", str(exc))
        except (StorageError, CollectiveError) as exc:
            failure = ("failure", str(exc))
    failure = broadcast_object(comm, failure)
    if failure is not None:
        kind, message = failure
        raise UsageError(message) if kind == "usage" else CollectiveError(message)
    return result


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


def say(text: str, file=None) -> None:
    """Write text and a newline in ONE write(2), after whatever the stream buffered.

    mpiexec merges the output of all ranks; a line written in one call (under
    PIPE_BUF, 4 KiB) reaches it whole, so lines of different ranks never share
    a line of the job's output.
    """
    stream = file or sys.stdout
    stream.flush()
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # a stream without a descriptor
        print(text, file=stream, flush=True)
        return
    data = (text + "\n").encode(errors="replace")
    while data:
        data = data[os.write(fd, data):]


def print0(comm: Comm, *args: Any, file=None) -> None:
    """Print once, from rank 0 (the one place ranks decide who logs)."""
    if comm.rank == 0:
        say(" ".join(str(a) for a in args), file)


def run_or_abort(comm: Comm, body: Callable[[], int]) -> int:
    """Run body() on every rank; turn failures into the documented exit codes.

    UsageError is raised on every rank alike (the ranks agreed on it) for bad
    usage or input: rank 0 prints the message once and all ranks return 2.
    CollectiveError is a run-time failure all ranks detected alike: printed once,
    all return 1; Interrupted likewise, 3. Anything else may be on one rank only,
    with the others already waiting in a collective: this rank says what failed
    (one line for a refused write or Ctrl-C, the traceback for anything else) and
    aborts the whole job with exit code 1, so nothing hangs.
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
        if isinstance(exc, KeyboardInterrupt):  # every rank gets mpiexec's SIGINT: one says
            print0(comm, "mpinn: interrupted (SIGINT)", file=sys.stderr)
        elif isinstance(exc, StorageError):
            say(f"{prefix}: {exc}", sys.stderr)
        else:
            say(f"{prefix}:\n{traceback.format_exc().rstrip()}", sys.stderr)
        if comm.size > 1:
            comm.Abort(1)
        return 1
