"""Every MPI call mpinn makes: the world, the gradient sync, reductions, agreement, abort.

Functions take the communicator explicitly so tests can pass COMM_SELF, a
Dup() of the world, or a counting wrapper. Arrays travel with the uppercase
buffer calls (in place where possible); only small control data (error
messages, metadata, configs) goes through the pickling lowercase calls.

Importing this module initialises MPI (mpi4py does so on import of MPI).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import pickle
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
from mpi4py import MPI

from mpinn.base.errors import CollectiveError, Interrupted, StorageError, UsageError

EXIT_INTERRUPTED = 3  # stopped by a signal, checkpoint written: resume with --resume

Comm = MPI.Comm
T = TypeVar("T")


def world() -> Comm:
    return MPI.COMM_WORLD


def library() -> str:
    """First line of the MPI library's version string, e.g. 'MPICH Version: 5.0.2'."""
    return " ".join(MPI.Get_library_version().splitlines()[0].split())


def library_version() -> str:
    """The MPI library's whole version text (MPICH names its device and configuration)."""
    return MPI.Get_library_version().strip()


def placement(comm: Comm) -> tuple[list[str], list[int]]:
    """Collective: the distinct hosts (MPI processor names, in order of their first
    rank) and how many ranks each runs."""
    hosts: dict[str, int] = {}
    for name in gather_objects(comm, MPI.Get_processor_name(), "an exchange of host names"):
        hosts[name] = hosts.get(name, 0) + 1
    return list(hosts), list(hosts.values())


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
        self.sq_norm = 0.0  # of the reduced gradient sum, set by finite()

    def allreduce(self, loss: float, stop: bool = False, bad_input: bool = False) -> None:
        """In place: gradients and control slots <- their sums over all ranks."""
        self.control[:] = (loss, stop, bad_input)
        complete(self.comm, self.comm.Iallreduce(MPI.IN_PLACE, self.buffer, op=MPI.SUM),
                 "the gradient Allreduce")

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
        self.sq_norm = float(np.dot(self.grads, self.grads))  # |g|^2, reused by --clip-norm
        return bool(np.isfinite(self.control[self.LOSS]) and np.isfinite(self.sq_norm))


# -- The waiting loop -------------------------------------------------------------------
#
# A rank blocked in MPI_Allreduce cannot tell which ranks are missing, and Python runs no
# signal handler while the main thread is inside MPI. So every collective of the training
# loop is started non-blocking and completed by `complete`: on a watched communicator it
# polls the request (MPI progresses a non-blocking collective while it is tested), answers
# census questions, notices stop requests, and, past the deadline, finds out who is
# missing, reports it once and aborts the job.

WATCHDOG = MPI.Comm.Create_keyval()  # a communicator's Watchdog, as an MPI attribute
PING, ANSWER = 1, 2  # message tags on the census communicator
ANSWER_BYTES = 256


def complete(comm: Comm, request: MPI.Request, what: str) -> None:
    """Wait for a non-blocking call on comm: through comm's Watchdog if it has one."""
    watchdog = comm.Get_attr(WATCHDOG)
    if watchdog is None:
        request.Wait()
    else:
        watchdog.wait(request, what)


class Watchdog:
    """The waiting loop of a communicator, with a deadline and a census of the ranks.

    wait() tests the request in a tight loop for SPIN seconds (what a blocking
    MPI call does anyway, so a healthy step waits no longer than before), then
    naps between tests, up to NAP seconds. Every rank keeps a receive posted on
    a duplicate of the communicator (so census messages never mix with the
    job's) and answers a census from its waiting loop with what it waits in.

    When a wait passes `timeout` seconds the rank asks every other rank and
    keeps testing its request for CENSUS seconds while the answers come in. If
    the call completes meanwhile, it was late, not stalled: the wait ends
    normally. Otherwise the lowest rank that ran a census reports (one message:
    where it waited, who answered what, who did not) and aborts the job, exit 1.
    After a stop signal the ranks have not yet agreed on, the deadline is
    STOP_GRACE seconds away, or twice the longest wait of this run if that is
    longer (a slow checkpoint write is not a stall): a stalled job cannot agree
    on a checkpoint, and the scheduler's SIGKILL follows its SIGTERM.
    """

    SPIN, NAP, STOP_GRACE, CENSUS = 0.05, 1e-3, 10.0, 5.0

    def __init__(self, comm: Comm, timeout: float, stop_requested: Callable[[], bool],
                 position: Callable[[], str]) -> None:
        self.comm, self.census = comm, comm.Dup()
        self.timeout = timeout or math.inf  # 0: no deadline (a stop request still has one)
        self.stop_requested, self.position = stop_requested, position
        self.hosts = gather_objects(comm, (MPI.Get_processor_name(), os.getpid()))
        self.what = ""
        self.longest = 0.0  # the longest wait that ended (seconds)
        self.asked_by_lower = -math.inf  # when a lower rank last asked this one
        self.ping = np.zeros(1, np.int64)
        self.inbox = self.census.Irecv(self.ping, MPI.ANY_SOURCE, PING)
        self.sent: list[MPI.Request] = []  # answers and questions on their way
        self.stale: list[MPI.Request] = []  # receives of a census that was not needed
        self.status = MPI.Status()

    def wait(self, request: MPI.Request, what: str) -> None:
        if request.Test():
            return
        self.what = what
        start = time.monotonic()
        deadline, nap = start + self.timeout, self.NAP / 16
        while not request.Test():
            self.serve()
            now = time.monotonic()
            if self.stop_requested():
                grace = min(max(self.STOP_GRACE, 2 * self.longest), self.timeout)
                deadline = min(deadline, now + grace)
            if now >= deadline:
                answers = self.ask_everyone(request)
                if answers is None:
                    break  # it completed during the census: late, not stalled
                self.report_stall(time.monotonic() - start, answers)
            if now - start > self.SPIN:
                time.sleep(nap)
                nap = min(2 * nap, self.NAP)
            else:  # let a rank that shares this core run (MPICH's own loop yields too)
                os.sched_yield()
        self.longest = max(self.longest, time.monotonic() - start)

    def serve(self) -> None:
        """Answer every census question that arrived: what this rank waits in, where."""
        while self.inbox.Test(self.status):
            source = self.status.Get_source()
            if source < self.comm.rank:
                self.asked_by_lower = time.monotonic()
            text = self.answer().encode()[:ANSWER_BYTES]
            self.sent.append(self.census.Isend(text.ljust(ANSWER_BYTES), source, ANSWER))
            self.inbox = self.census.Irecv(self.ping, MPI.ANY_SOURCE, PING)

    def ask_everyone(self, request: MPI.Request) -> dict[int, str | None] | None:
        """The census: every other rank's answer, or None for a rank that gave none in
        time. None instead of the answers if `request` completed meanwhile (answers
        still on their way are then left to arrive: the next census's receives
        would take stale ones, which only changes its wording)."""
        others = [r for r in range(self.comm.size) if r != self.comm.rank]
        replies = {r: bytearray(ANSWER_BYTES) for r in others}
        received = {r: self.census.Irecv(replies[r], r, ANSWER) for r in others}
        asked = [self.census.Isend(np.array([self.comm.rank], np.int64), r, PING)
                 for r in others]
        end = time.monotonic() + max(1.0, min(self.CENSUS, self.timeout / 2))
        while time.monotonic() < end and not all(req.Test() for req in received.values()):
            if request.Test():
                self.sent += asked
                self.stale += received.values()
                return None
            self.serve()
            time.sleep(self.NAP)
        del asked  # unanswered questions stay unanswered: the job ends now
        return {r: bytes(replies[r]).decode(errors="replace").strip() if req.Test() else None
                for r, req in received.items()}

    def report_stall(self, waited: float, answers: dict[int, str | None]) -> None:
        """The lowest asking rank reports the census and aborts the job; a rank that a
        lower one asked lately answers on, and reports only if the job lives on."""
        if time.monotonic() - self.asked_by_lower < 2 * self.CENSUS:
            end = time.monotonic() + 2 * self.CENSUS + 10
            while time.monotonic() < end:
                self.serve()
                time.sleep(self.NAP)
        say(f"mpinn: failed: {self.stall_message(waited, answers)}", sys.stderr)
        abort(self.comm)

    def stall_message(self, waited: float, answers: dict[int, str | None]) -> str:
        me, mine = self.comm.rank, self.answer()
        silent = [r for r, a in answers.items() if a is None]
        cause = ("a stop signal arrived, but the ranks cannot agree on a checkpoint"
                 if self.stop_requested() else f"--stall-timeout {self.timeout:g} s passed")
        lines = [("stalled: " + ", ".join(f"rank {r} ({self.hosts[r][0]}, pid "
                                          f"{self.hosts[r][1]})" for r in silent)
                  + " did not answer: stopped, swapping, stuck in I/O, or dead.") if silent
                 else "stalled: every rank answered, but not in the same collective.",
                 f"Rank {me} of {self.comm.size} waited {waited:.0f} s in {self.what} at "
                 f"{self.position()} ({cause})."]
        by_answer: dict[str, list[int]] = {}
        for r, a in answers.items():
            if a is not None:
                by_answer.setdefault(a, []).append(r)
        lines += [f"{'Ranks' if len(rs) > 1 else 'Rank'} {', '.join(map(str, rs))}: "
                  + ("waiting in the same call." if a == mine else f"{a}.")
                  for a, rs in by_answer.items()]
        lines.append("Ending the job; continue from the newest checkpoint with --resume.")
        return "\n  ".join(lines)

    def answer(self) -> str:
        """What this rank tells a census: the call it waits in, and where in the run."""
        return f"waiting in {self.what} at {self.position()}"

    def close(self) -> None:
        """Withdraw the posted receives and free the census communicator (collective)."""
        for request in (self.inbox, *self.stale):
            if request != MPI.REQUEST_NULL:  # not completed yet
                request.Cancel()
                request.Wait()
        MPI.Request.Waitall(self.sent)  # a few small messages: sent eagerly
        self.census.Free()


@contextlib.contextmanager
def watching(comm: Comm, timeout: float, stop_requested: Callable[[], bool],
             position: Callable[[], str]) -> Iterator[Watchdog]:
    """Collective: comm's collectives wait through a Watchdog for the duration.

    On an error the census communicator is left to the end of the process: the
    other ranks may not be here to free it together.
    """
    watchdog = Watchdog(comm, timeout, stop_requested, position)
    comm.Set_attr(WATCHDOG, watchdog)
    try:
        yield watchdog
    except BaseException:
        comm.Delete_attr(WATCHDOG)
        raise
    comm.Delete_attr(WATCHDOG)
    watchdog.close()


def allreduce_sum(comm: Comm, buf: np.ndarray, what: str = "a sum over ranks") -> None:
    """In place: buf <- sum over ranks of buf. Every rank must call it with the same shape."""
    complete(comm, comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM), what)


def bare_allreduce(comm: Comm, buf: np.ndarray) -> None:
    """The plain blocking MPI_Allreduce (SUM, in place): the benchmarks' reference."""
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)


def timed_allreduce(comm: Comm, buf: np.ndarray, repeats: int, blocking: bool) -> float:
    """Seconds per in-place SUM Allreduce of buf on this rank, over `repeats` calls after a
    barrier: the blocking MPI_Allreduce, or MPI_Iallreduce + Wait (what the gradient
    sync runs; MPICH picks its algorithms separately for the two)."""
    comm.Barrier()
    began = time.perf_counter()
    for _ in range(repeats):
        if blocking:
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        else:
            comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM).Wait()
    return (time.perf_counter() - began) / repeats


def ping_pong(comm: Comm, peer: int, buf: np.ndarray, repeats: int, lead: bool) -> float:
    """Seconds per round trip of buf between this rank and peer (the lead sends first,
    the other sends back what it received). Only the two ranks take part."""
    began = time.perf_counter()
    for _ in range(repeats):
        if lead:
            comm.Send(buf, peer, 7)
            comm.Recv(buf, peer, 7)
        else:
            comm.Recv(buf, peer, 7)
            comm.Send(buf, peer, 7)
    return (time.perf_counter() - began) / repeats


def exchange(comm: Comm, peer: int, buf: np.ndarray, into: np.ndarray, repeats: int) -> float:
    """Seconds per MPI_Sendrecv of buf to peer while receiving peer's into `into`: both
    directions at once, the step of recursive doubling and halving."""
    began = time.perf_counter()
    for _ in range(repeats):
        comm.Sendrecv(buf, peer, 8, into, peer, 8)
    return (time.perf_counter() - began) / repeats


def processor_name() -> str:
    """This rank's host as MPI names it (what placement() counts)."""
    return MPI.Get_processor_name()


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


def first_error(comm: Comm, message: str | None) -> str | None:
    """Collective: the message of the lowest rank that has one, on every rank.

    This is how ranks agree that input is bad before anything else is
    collective: each validates what it can see, then all learn whether anyone
    failed, so all exit together with the same message instead of hanging.
    """
    return next((m for m in gather_objects(comm, message, "an agreement on an error")
                 if m is not None), None)


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


def barrier(comm: Comm, what: str = "a barrier") -> None:
    complete(comm, comm.Ibarrier(), what)


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
            abort(comm)
        return 1


def abort(comm: Comm) -> None:
    """End every rank of the job (exit code 1), a moment after this rank's last message.

    The launcher forwards each rank's stderr through a pipe and handles the abort
    on another channel; without the pause it may tear the job down before it has
    drained the pipe, and the one message that says what happened is lost.
    """
    time.sleep(0.2)
    comm.Abort(1)
