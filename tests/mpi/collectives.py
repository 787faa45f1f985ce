"""Run under mpiexec -n P: dist.py and the sampler on COMM_WORLD, COMM_SELF and a Dup().

Expected values are derived from rank and size, so the same script passes at any P.
A failed assert raises on that rank; run_or_abort then aborts the job (exit 1).
"""

import numpy as np
from mpi4py import MPI

from mpinn import data, dist
from mpinn.errors import CollectiveError


def check(comm) -> None:
    rank, size = comm.rank, comm.size
    buf = np.array([rank + 1.0, 2.0 ** rank, -rank])
    dist.allreduce_sum(comm, buf)
    assert np.array_equal(buf, [size * (size + 1) / 2, 2.0 ** size - 1, -size * (size - 1) / 2])
    peak = np.array([float(rank)])
    dist.allreduce_max(comm, peak)
    assert peak[0] == size - 1
    assert dist.first_error(comm, None) is None
    assert dist.first_error(comm, f"bad {rank}" if rank == size - 1 else None) == f"bad {size - 1}"
    same = np.arange(10.0)
    dist.check_identical(comm, same, "same")
    if size > 1:
        try:
            dist.check_identical(comm, same + (rank == 1), "weights")
            raise AssertionError("check_identical missed a difference")
        except CollectiveError as exc:
            assert "ranks [1]" in str(exc)
    root_data = np.full(4, 7.0) if rank == 0 else np.zeros(4)
    dist.broadcast(comm, root_data)
    assert np.all(root_data == 7.0)

    # every sample exactly once per epoch, whatever P, B and shuffle
    for n, batch, shuffle in [(103, 10, True), (103, 7, False), (50, 64, True), (5, 2, True),
                              (3, 8, False)]:
        order = data.epoch_order(11, 2, n, shuffle)
        mine = [idx for idx, _ in data.local_batches(order, batch, rank, size)]
        steps = [len(m) for m in mine]
        assert len(mine) == data.steps_per_epoch(n, batch)  # all ranks take part in every step
        everyone = comm.allgather(mine)
        for step in range(len(mine)):
            joined = np.concatenate([everyone[r][step] for r in range(size)])
            # ranks' shares, in rank order, are the global batch: a contiguous split
            assert np.array_equal(joined, order[step * batch:(step + 1) * batch])
        used = np.sort(np.concatenate([i for r in everyone for i in r]))
        assert np.array_equal(used, np.arange(n)), (n, batch, shuffle)
        sizes = comm.allgather(steps)
        for step in range(len(mine)):
            counts = [s[step] for s in sizes]
            assert max(counts) - min(counts) <= 1


world = dist.world()
for comm in (world, MPI.COMM_SELF, world.Dup()):
    check(comm)
dist.print0(world, f"collectives ok on {world.size} ranks")
