"""Stop requests: SIGINT (Ctrl-C, which mpiexec forwards to every rank), SIGTERM and
SIGUSR1 (what SLURM sends before a time limit or a preemption) set a flag, and
nothing else. The training loop adds the flag to the step's gradient Allreduce,
so all ranks learn at the same step boundary that some rank was signalled,
checkpoint together, and exit with code 3.

A second Ctrl-C ends the process at once, also while its main thread waits
inside a blocking MPI call for a rank that is stuck (no Python signal handler
runs then): the C-level handler writes every signal's number to a wakeup file
descriptor, which a watcher thread reads. SIGTERM and SIGUSR1 never escalate:
they may legitimately arrive twice (a forwarded USR1 and SLURM's own TERM at a
preemption), and SLURM follows them with SIGKILL if the job does not end.
"""

from __future__ import annotations

import os
import signal
import socket
import threading

from mpinn.base.errors import EXIT_SIGINT

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Context manager installing the handlers; `requested` turns true on a signal.

    The handlers stay installed after the context ends: a signal that arrives
    while a rank is finishing (writing the summary, finalising MPI) must not
    kill it with the default action; the run is complete anyway.
    """

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame) -> None:
        self.requested = True  # only a flag: no I/O, no MPI in a signal handler

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._handle)
            reader, writer = socket.socketpair()
            writer.setblocking(False)
            signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
            threading.Thread(target=watch_interrupts, args=(reader, writer), daemon=True,
                             name="mpinn-signals").start()
        return self

    def __exit__(self, *exc) -> None:
        pass


def watch_interrupts(reader: socket.socket, writer: socket.socket) -> None:
    """End the process on the second SIGINT (writer is kept open for the C handler)."""
    interrupts = 0
    while data := reader.recv(64):
        interrupts += data.count(signal.SIGINT)
        if interrupts >= 2:
            os.write(2, b"mpinn: a second Ctrl-C: ending now, without a checkpoint\n")
            os._exit(EXIT_SIGINT)
