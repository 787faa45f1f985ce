"""Run under mpiexec -n P: the collectives, the gradient sync and the sampler on
COMM_WORLD, COMM_SELF, a Dup(), and a Dup() whose collectives wait through the stall watchdog.

Expected values are derived from rank and size, so the same script passes at any P.
A failed assert raises on that rank; run_or_abort then aborts the job (exit 1).
"""

import sys

import numpy as np
from mpi4py import MPI

from mpinn.base.errors import CollectiveError, StorageError, UsageError
from mpinn.comm import collectives, console, exits, gradsync, watchdog, world
from mpinn.data import sampler


def check(comm) -> None:
    rank, size = comm.rank, comm.size
    buf = np.array([rank + 1.0, 2.0 ** rank, -rank])
    collectives.allreduce_sum(comm, buf)
    assert np.array_equal(buf, [size * (size + 1) / 2, 2.0 ** size - 1, -size * (size - 1) / 2])
    peak = np.array([float(rank)])
    collectives.allreduce_max(comm, peak)
    assert peak[0] == size - 1
    assert collectives.first_error(comm, None) is None
    last = f"bad {rank}" if rank == size - 1 else None
    assert collectives.first_error(comm, last) == f"bad {size - 1}"
    same = np.arange(10.0)
    collectives.check_identical(comm, same, "same")
    if size > 1:
        try:
            collectives.check_identical(comm, same + (rank == 1), "weights")
            raise AssertionError("check_identical missed a difference")
        except CollectiveError as exc:
            assert "ranks [1]" in str(exc)
    # control data travels pickled through non-blocking buffer calls: any size, even empty
    assert collectives.gather_objects(comm, "x" * rank) == ["x" * r for r in range(size)]
    sent = {"rows": list(range(10000))} if rank == 0 else None
    assert collectives.broadcast_object(comm, sent) == {"rows": list(range(10000))}
    collectives.barrier(comm)
    root_data = np.full(4, 7.0) if rank == 0 else np.zeros(4)
    collectives.broadcast(comm, root_data)
    assert np.all(root_data == 7.0)

    # the gradient sync: gradients and control slots SUMMED, the same verdicts everywhere
    sync = gradsync.GradientSync(comm, 3, "float64")
    sync.grads[:] = (rank, 1.0, -2.0 * rank)
    sync.allreduce(loss=rank + 1.0, stop=rank == size - 1, bad_input=False)
    assert np.array_equal(sync.grads, [size * (size - 1) / 2, size, -size * (size - 1)])
    assert sync.loss == size * (size + 1) / 2 and sync.stop_requested and not sync.bad_input
    assert sync.control[sync.STOP] == 1 and sync.finite()
    sync.grads[:] = np.inf if rank == size - 1 else 0.0  # on one rank only: all see it
    sync.allreduce(loss=1.0, bad_input=rank == 0)
    assert sync.bad_input and not sync.stop_requested and not sync.finite()
    made = collectives.root_tries(comm, lambda: "made by rank 0")
    assert made == ("made by rank 0" if rank == 0 else None)
    for failure, expected in ((UsageError("bad"), UsageError),
                              (StorageError("full"), CollectiveError)):
        def fail(exc=failure):
            raise exc
        try:
            collectives.root_tries(comm, fail)
            raise AssertionError("root_tries did not raise on every rank")
        except expected as exc:
            assert str(exc) == str(failure)

    # every sample exactly once per epoch, whatever P, B and shuffle mode
    for n, batch, mode, block, window in [
            (103, 10, "global", 0, 0), (103, 7, "none", 0, 0), (50, 64, "global", 0, 0),
            (5, 2, "global", 0, 0), (3, 8, "none", 0, 0), (1000, 64, "block", 16, 256),
            (997, 30, "block", 7, 100), (40, 16, "block", 64, 10), (9, 4, "block", 2, 4)]:
        sampling = sampler.Sampling(mode, block or 1024, window or 65536)
        plan = sampler.epoch_plan(sampling, 11, 2, n, batch, rank, size)
        assert len(plan) == sampler.steps_per_epoch(n, batch)  # every rank, every step
        everyone = comm.allgather(plan.steps)
        for step in range(len(plan)):
            counts = [len(everyone[r][step]) for r in range(size)]
            shares = [sampler.share(int(plan.batch_rows[step]), r, size) for r in range(size)]
            assert counts == [hi - lo for lo, hi in shares]  # the global batch's shares
            if mode != "block":  # P-invariant modes: the shares ARE the global order's batch
                joined = np.concatenate([everyone[r][step] for r in range(size)])
                order = sampler.epoch_order(11, 2, n, mode == "global")
                assert np.array_equal(joined, order[step * batch:(step + 1) * batch])
        used = np.sort(np.concatenate([i for r in everyone for i in r]))
        assert np.array_equal(used, np.arange(n)), (n, batch, mode)
        for first, ranges in plan.windows:  # a window's ranges hold exactly its steps' rows
            following = [f for f, _ in plan.windows if f > first]
            stop = following[0] if following else len(plan)
            rows = np.sort(np.concatenate(plan.steps[first:stop]))
            covered = np.concatenate([np.arange(a, b) for a, b in ranges] or [np.zeros(0, int)])
            assert np.array_equal(rows, covered)


def main() -> int:
    for comm in (WORLD, MPI.COMM_SELF, WORLD.Dup()):
        check(comm)
    watched = WORLD.Dup()  # the same, waiting through the stall watchdog's loop
    with watchdog.watching(watched, 30, lambda: False, lambda: "collectives.py") as waiting:
        assert [host for host, _ in waiting.hosts] == collectives.gather_objects(
            WORLD, MPI.Get_processor_name())
        check(watched)
    console.print0(WORLD, f"collectives ok on {WORLD.size} ranks")
    return 0


WORLD = world.start()
sys.exit(exits.run_or_abort(WORLD, main))  # a failed assert on one rank ends all
