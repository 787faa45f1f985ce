"""Run under mpiexec -n P: a parallel `mpinn data synth` whose write fails on one rank.

KIND storage: rank FAIL's CALL-th collective write step (an MPI-IO write_at_all, or an
HDF5 call of the mpio driver) completes on every rank, and then reports ENOSPC to rank
FAIL alone, as a file system that filled up under that rank's part would. All ranks must
agree and end: exit 1, one message, no temporary file.
KIND bug: rank FAIL raises a RuntimeError while producing its CALL-th block, alone; the
job must be aborted (exit 1) and the temporary file removed.
Usage: fail_write.py FAIL CALL KIND -- <mpinn data synth arguments>
"""

import contextlib
import errno
import sys

from mpinn.cli import main as cli
from mpinn.comm import mpiio, world
from mpinn.data import datasets, pwrite

WORLD = world.start()  # as cli.main will (a no-op there)
fail_rank, fail_call, kind = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
calls = {"n": 0}


def failing_here() -> bool:
    calls["n"] += 1
    return WORLD.rank == fail_rank and calls["n"] == fail_call


def no_space() -> OSError:
    return OSError(errno.ENOSPC, f"No space left on device (injected on rank {fail_rank})")


real_write_at_all, real_errors = mpiio.write_at_all, pwrite.hdf5_write_errors


def write_at_all(fh, offset, buf, path):
    real_write_at_all(fh, offset, buf, path)
    if failing_here():
        raise pwrite.StorageError(f"cannot write {path}: injected ENOSPC on rank {fail_rank}")


@contextlib.contextmanager
def hdf5_write_errors(path):
    with real_errors(path):
        yield
        if failing_here():
            raise no_space()


real_block = datasets.synth_block


def synth_block(*args, **kwargs):
    if failing_here():
        raise RuntimeError(f"injected bug on rank {fail_rank}")
    return real_block(*args, **kwargs)


if kind == "storage":
    mpiio.write_at_all, pwrite.hdf5_write_errors = write_at_all, hdf5_write_errors
else:
    datasets.synth_block = synth_block
sys.exit(cli.main(sys.argv[5:]))
