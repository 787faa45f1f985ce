"""How a parallel command ends: an error every rank raised alike becomes its exit code
(one message, from rank 0); anything else may be on one rank only, so that rank says
what failed and aborts the whole job, and no rank is left waiting in a collective."""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable

from mpinn.base.console import say
from mpinn.base.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    CollectiveError,
    Interrupted,
    StorageError,
    UsageError,
)
from mpinn.comm import shm
from mpinn.comm.console import print0
from mpinn.comm.world import Comm


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
        return EXIT_USAGE
    except CollectiveError as exc:
        print0(comm, f"mpinn: failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
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
        return EXIT_FAILED


def abort(comm: Comm) -> None:
    """End every rank of the job (exit code 1), a moment after this rank's last message.

    The launcher forwards each rank's stderr through a pipe and handles the abort
    on another channel; without the pause it may tear the job down before it has
    drained the pipe, and the one message that says what happened is lost. MPI_Abort
    leaves this node's shared-memory segment behind: its name is removed first.
    """
    time.sleep(0.2)
    shm.release_segments()  # MPI_Abort skips MPICH's cleanup of this node's segment
    comm.Abort(EXIT_FAILED)
