"""Run under mpiexec -n P: a stop request while the prefetch threads read ahead.

Rank 1's prefetch thread is slowed down where it waits for a free buffer, so it
lags behind the others; rank 0 signals itself at step STEP. With the mpio reader
every read is a collective, so all ranks' threads must make the same reads
before they stop: the job must end with exit code 3 (checkpointed), not hang,
and every rank must have made the same number of reads.
Usage: stop_while_prefetching.py STEP -- <mpinn train arguments>
"""

import os
import signal
import sys
import time

from mpinn.cli import main as cli
from mpinn.comm import world
from mpinn.data import feed
from mpinn.train import loop as train

stop_step = int(sys.argv[1])
WORLD = world.start()  # as cli.main will (a no-op there)
rank = WORLD.rank
real_init, real_fill = feed.Feed.__init__, feed.Feed._fill
steps, fills = {"n": 0}, {"n": 0}


def lagging_init(self, *args, **kwargs):
    real_init(self, *args, **kwargs)
    if rank == 1:  # the thread reaches for the next free buffer late
        real_get = self._free.get
        self._free.get = lambda: (time.sleep(0.2), real_get())[1]


def counting_fill(self, step, slot):
    fills["n"] += 1
    return real_fill(self, step, slot)


def signalling_step(*args, **kwargs):
    steps["n"] += 1
    if rank == 0 and steps["n"] == stop_step:
        os.kill(os.getpid(), signal.SIGUSR1)
    return real_step(*args, **kwargs)


real_step = train.train_step
feed.Feed.__init__, feed.Feed._fill = lagging_init, counting_fill
train.train_step = signalling_step
code = cli.main(sys.argv[3:])
counts = WORLD.allgather(fills["n"])
if rank == 0:
    print(f"reads per rank: {counts}")
sys.exit(code)
