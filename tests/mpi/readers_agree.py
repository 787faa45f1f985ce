"""Run under mpiexec -n P: every reader delivers the same batches as plain h5py.

For each shuffle mode and batch size, a Feed over each available reader
(independent always; mpio when h5py has parallel HDF5) must deliver, step by
step, exactly the rows an independent oracle reads with h5py's own indexing.
With mpio, every read must have been done collectively (HDF5's actual I/O mode).
Usage: readers_agree.py DATA.h5 BATCH [BATCH ...]
"""

import sys

import h5py
import numpy as np

from mpinn.comm import collectives, console, exits, world
from mpinn.data.feed import Buffers, Feed
from mpinn.data.readers import ACTUAL_IO_MODES, DataFile, parallel_hdf5
from mpinn.data.sampler import SHUFFLES, Sampling, epoch_plan

COLLECTIVE = {ACTUAL_IO_MODES[m] for m in (2, 3, 4)}


def main() -> int:
    comm = world.start()
    path, batches = sys.argv[1], [int(b) for b in sys.argv[2:]]
    with h5py.File(path, "r") as f:
        x_all, y_all = f["train/x"][...], f["train/y"][...]  # the oracle (a small file)
    readers = ["independent"] + (["mpio"] if parallel_hdf5() else [])
    checked = 0
    for io in readers:
        with DataFile(path, io, comm) as datafile:
            for batch in batches:
                for shuffle in SHUFFLES:
                    sampling = Sampling(shuffle, block_rows=7, window_rows=3 * batch)
                    max_rows = -(-batch // comm.size)
                    reader = datafile.reader("train", max_rows)
                    buffers = Buffers(reader, max_rows, 3 * max_rows if shuffle == "block" else 0)
                    plan = epoch_plan(sampling, 5, 1, reader.n, batch, comm.rank, comm.size)
                    prefetch = io != "mpio" or world.thread_multiple()
                    for step, got in enumerate(Feed(reader, plan, buffers, prefetch)):
                        idx = plan.steps[step]
                        assert np.array_equal(got.x, x_all[idx]), (io, batch, shuffle, step)
                        assert np.array_equal(got.y, y_all[idx]), (io, batch, shuffle, step)
                        assert got.rows == plan.batch_rows[step] and got.bad is None
                        checked += 1
            if io == "mpio":
                modes = set(datafile.io_modes)
                assert modes and modes <= COLLECTIVE, f"not all reads were collective: {modes}"
    total = collectives.gather_objects(comm, checked)
    console.print0(comm, f"readers agree: {' '.join(readers)} on {comm.size} ranks, "
                      f"{sum(total)} batches")
    return 0


sys.exit(exits.run_or_abort(world.start(), main))
