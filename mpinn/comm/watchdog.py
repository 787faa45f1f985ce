"""The waiting loop of a communicator: a deadline, a census of the ranks, and a report.

A rank blocked in MPI_Allreduce cannot tell which ranks are missing, and Python runs no
signal handler while the main thread is inside MPI. So every collective of the training
loop is started non-blocking and completed by collectives.complete: on a watched
communicator it polls the request (MPI progresses a non-blocking collective while it is
tested), answers census questions, notices stop requests, and, past the deadline, finds
out who is missing, reports it once and aborts the job.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
from mpi4py import MPI

from mpinn.base.console import say
from mpinn.base.errors import CollectiveError, Interrupted, UsageError
from mpinn.comm.collectives import gather_objects, waiting_key
from mpinn.comm.exits import abort
from mpinn.comm.world import Comm, processor_name

PING, ANSWER = 1, 2  # message tags on the census communicator
ANSWER_BYTES = 256


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
        self.hosts = gather_objects(comm, (processor_name(), os.getpid()))
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

    def withdraw(self) -> None:
        """Cancel the posted receives (local): a request left pending is reported by the
        transport at exit (UCX: 'object ... was not returned to mpool ucp_requests')."""
        for request in (self.inbox, *self.stale):
            if request != MPI.REQUEST_NULL:  # not completed yet
                request.Cancel()
                request.Wait()

    def close(self) -> None:
        """Withdraw the posted receives, complete the sends and free the census
        communicator (collective: only where every rank closes)."""
        self.withdraw()
        MPI.Request.Waitall(self.sent)  # a few small messages: sent eagerly
        self.census.Free()


@contextlib.contextmanager
def watching(comm: Comm, timeout: float, stop_requested: Callable[[], bool],
             position: Callable[[], str]) -> Iterator[Watchdog]:
    """Collective: comm's collectives wait through a Watchdog for the duration.

    Every way out closes it. An error every rank raised alike (bad input, an agreed
    failure, a stop by a signal) closes it collectively, as success does; after any
    other error the other ranks may not be here to free the census communicator
    together, so only this rank's receives are withdrawn, and the abort follows.
    """
    watchdog = Watchdog(comm, timeout, stop_requested, position)
    comm.Set_attr(waiting_key(), watchdog)
    try:
        yield watchdog
    except (UsageError, CollectiveError, Interrupted):
        comm.Delete_attr(waiting_key())
        watchdog.close()
        raise
    except BaseException:
        comm.Delete_attr(waiting_key())
        watchdog.withdraw()
        raise
    comm.Delete_attr(waiting_key())
    watchdog.close()
