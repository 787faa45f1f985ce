"""Run under mpiexec -n P: rank FAIL raises during step STEP of a real training run.

The exception is injected into the data reader of one rank only; the others are
then (or soon) waiting in the gradient Allreduce. The CLI's error handling must
end the whole job with exit code 1, not leave them waiting.
Usage: fail_rank.py FAIL STEP -- <mpinn train arguments>
"""

import sys

from mpi4py import MPI

from mpinn.cli import main as cli
from mpinn.data import readers

fail_rank, fail_step = int(sys.argv[1]), int(sys.argv[2])
original = readers.SplitReader.read
calls = {"n": 0}


def failing_read(self, indices, x_out, y_out):
    calls["n"] += 1
    if MPI.COMM_WORLD.rank == fail_rank and calls["n"] == fail_step:
        raise OSError(f"injected read failure on rank {fail_rank} at step {fail_step}")
    return original(self, indices, x_out, y_out)


readers.SplitReader.read = failing_read
sys.exit(cli.main(sys.argv[4:]))
