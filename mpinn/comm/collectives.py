"""Collectives: sums and maxima over ranks, broadcasts, exchanges of control data, and the
agreements built on them (on an error, on rank 0's verdict, on bitwise equal arrays).

Arrays travel with the uppercase buffer calls, in place where possible; only small
control data (error messages, metadata, configs) is pickled, and travels as bytes.
Every call is started in its non-blocking form and completed by `complete`, which hands
the wait to the communicator's waiting loop if one is attached (watchdog.py): a rank
blocked inside MPI_Allreduce could neither tell who is missing nor run a signal handler.
"""

from __future__ import annotations

import functools
import hashlib
import pickle
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from mpi4py import MPI

from mpinn.base.errors import CollectiveError, StorageError, UsageError
from mpinn.comm.world import Comm

T = TypeVar("T")


@functools.cache
def waiting_key() -> int:
    """The attribute key under which a communicator carries its waiting loop; created on
    first use (MPI runs by then), never at import."""
    return MPI.Comm.Create_keyval()


def complete(comm: Comm, request: MPI.Request, what: str) -> None:
    """Wait for a non-blocking call on comm: through comm's waiting loop if it has one."""
    waiting = comm.Get_attr(waiting_key())
    if waiting is None:
        request.Wait()
    else:
        waiting.wait(request, what)


def allreduce_sum(comm: Comm, buf: np.ndarray, what: str = "a sum over ranks") -> None:
    """In place: buf <- sum over ranks of buf. Every rank must call it with the same shape."""
    complete(comm, comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM), what)


def allreduce_max(comm: Comm, buf: np.ndarray, what: str = "a maximum over ranks") -> None:
    """In place: buf <- elementwise max over ranks of buf."""
    complete(comm, comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.MAX), what)


def broadcast(comm: Comm, buf: np.ndarray, root: int = 0, what: str = "a broadcast") -> None:
    """In place: every rank's buf <- root's buf."""
    complete(comm, comm.Ibcast(buf, root=root), what)


def broadcast_object(comm: Comm, obj: Any, root: int = 0, what: str = "a broadcast") -> Any:
    """Small control data only (configs, metadata): pickled, sent as its length, then
    its bytes (two non-blocking broadcasts, so a watched wait can report a stall)."""
    data = pickle.dumps(obj) if comm.rank == root else b""
    length = np.array([len(data)], np.int64)
    broadcast(comm, length, root, what)
    buf = np.frombuffer(data, np.uint8).copy() if comm.rank == root else \
        np.empty(int(length[0]), np.uint8)
    broadcast(comm, buf, root, what)
    return obj if comm.rank == root else pickle.loads(buf.tobytes())


def gather_objects(comm: Comm, obj: Any, what: str = "an exchange of control data"
                   ) -> list[Any]:
    """Small control data only: every rank gets the list of all ranks' obj."""
    data = np.frombuffer(pickle.dumps(obj), np.uint8)
    lengths = np.zeros(comm.size, np.int64)
    complete(comm, comm.Iallgather(np.array([len(data)], np.int64), lengths), what)
    offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    everything = np.empty(int(lengths.sum()), np.uint8)
    complete(comm, comm.Iallgatherv(data, [everything, (lengths, offsets), MPI.BYTE]), what)
    return [pickle.loads(everything[o:o + n].tobytes()) for o, n in zip(offsets, lengths)]


def barrier(comm: Comm, what: str = "a barrier") -> None:
    complete(comm, comm.Ibarrier(), what)


def first_error(comm: Comm, message: str | None) -> str | None:
    """Collective: the message of the lowest rank that has one, on every rank.

    This is how ranks agree that input is bad before anything else is
    collective: each validates what it can see, then all learn whether anyone
    failed, so all exit together with the same message instead of hanging.
    """
    return next((m for m in gather_objects(comm, message, "an agreement on an error")
                 if m is not None), None)


def all_try(comm: Comm, action: Callable[..., T], *args: Any) -> T | None:
    """Collective: every rank runs action(*args); then all agree on how it went. A
    UsageError on any rank becomes a UsageError on every rank (exit 2), a StorageError
    or CollectiveError a CollectiveError (exit 1), with the lowest such rank's message.

    How a sequence of collectives (the rounds of a parallel write) meets an error that
    one rank alone sees: each collective step is followed by this agreement, so no rank
    goes on to the next collective, or to a collective cleanup, while another has
    stopped. Anything else raised is a bug on that rank and aborts the job.
    """
    result, failure = None, None
    try:
        result = action(*args)
    except UsageError as exc:
        failure = ("usage", str(exc))
    except (StorageError, CollectiveError) as exc:
        failure = ("failure", str(exc))
    if comm.size > 1:
        failure = next((f for f in gather_objects(comm, failure, "an agreement on a step")
                        if f is not None), None)
    if failure is not None:
        kind, message = failure
        raise UsageError(message) if kind == "usage" else CollectiveError(message)
    return result


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
    failure = broadcast_object(comm, failure, what="rank 0's verdict on a file it handles")
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
