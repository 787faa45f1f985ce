"""Run under mpiexec -n P: a read-ahead that fails on one rank, never asked for.

Block shuffle with windows of 3 steps: rank 0 signals itself at step 1, so the
run stops inside window 0 while the window loaders read window 1 ahead. Rank
1's load of window 1 fails. No step ever asks for that window, so the error
must surface when the feed is closed: the job has to end with exit code 1
(rank 1 aborts all), not hang with rank 0 in window 1's collective read.
Usage: fail_read_ahead.py -- <mpinn train arguments>
"""

import os
import signal
import sys

from mpinn.cli import main as cli
from mpinn.comm import world
from mpinn.data import windows
from mpinn.train import loop as train

WORLD = world.start()  # as cli.main will (a no-op there)
rank = WORLD.rank
real_load, real_step = windows.Windows._load, train.train_step
steps = {"n": 0}


def failing_load(self, number, buffer):
    if rank == 1 and number == 1:
        raise OSError("injected failure reading window 1 ahead")
    return real_load(self, number, buffer)


def signalling_step(*args, **kwargs):
    steps["n"] += 1
    if rank == 0 and steps["n"] == 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    return real_step(*args, **kwargs)


windows.Windows._load, train.train_step = failing_load, signalling_step
sys.exit(cli.main(sys.argv[2:]))
