"""Stop requests: SIGINT (Ctrl-C, which mpiexec forwards to every rank), SIGTERM and
SIGUSR1 (what SLURM sends before a time limit or a preemption) set a flag, and
nothing else. The training loop adds the flag to the step's gradient Allreduce,
so all ranks learn at the same step boundary that some rank was signalled,
checkpoint together, and exit with code 3. A second signal ends the process at
once (a second Ctrl-C: mpiexec also aborts the job).
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Context manager installing the handlers; `requested` turns true on a signal.

    The handlers stay installed after the context ends: a signal that arrives
    while a rank is finishing (writing the summary, finalising MPI) must not
    kill it with the default action; the run is complete anyway. The first
    signal hands all three back to the kernel's default action, so a second one
    ends the process at once, even while it waits inside an MPI call (where no
    Python handler can run): a rank stuck in a collective can still be ended.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    def _handle(self, signum: int, frame) -> None:
        self.requested = True  # only a flag: no I/O, no MPI in a signal handler
        self.signal_name = signal.Signals(signum).name
        for sig in STOP_SIGNALS:  # the next one: the default action, ending the process
            signal.signal(sig, signal.SIG_DFL)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        pass
