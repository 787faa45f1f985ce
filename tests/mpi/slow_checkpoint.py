"""Run under mpiexec -n P: rank 0's checkpoint writes take SECONDS longer from the
second on (a slow file system), while the other ranks wait for its verdict.

A wait that outlasts --stall-timeout but ends during the census that follows is a
late rank, not a stalled one: the run must go on and end normally.
Usage: slow_checkpoint.py SECONDS -- <mpinn train arguments>
"""

import sys
import time

from mpinn.cli import main as cli
from mpinn.run import history

delay = float(sys.argv[1])
original = history.History.save
calls = {"n": 0}


def slow_save(self, step, image):
    calls["n"] += 1
    if calls["n"] >= 2:
        time.sleep(delay)
    return original(self, step, image)


history.History.save = slow_save
sys.exit(cli.main(sys.argv[3:]))
