"""Run under a launcher: each rank records the signals it receives, to see what the
launcher forwards when the signal is sent to the launcher itself.

Each rank appends the name of every SIGUSR1, SIGUSR2, SIGTERM, SIGINT, SIGHUP and SIGCONT
it gets to DIR/rank<R>, creates DIR/ready<R> once its handlers are installed, and
ends normally after SECONDS (writing "ended"), unless the launcher kills it first.
Usage: signal_probe.py DIR SECONDS
"""

import signal
import sys
import time
from pathlib import Path

from mpi4py import MPI

out, seconds = Path(sys.argv[1]), float(sys.argv[2])
rank = MPI.COMM_WORLD.rank
log = out / f"rank{rank}"


def record(signum, frame):
    with log.open("a") as f:
        f.write(signal.Signals(signum).name + "\n")


for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
          signal.SIGCONT):
    signal.signal(s, record)
(out / f"ready{rank}").touch()
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    time.sleep(0.02)  # no MPI call here: a Python handler runs between two sleeps
with log.open("a") as f:
    f.write("ended\n")
