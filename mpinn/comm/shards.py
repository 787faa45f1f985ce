"""The sharded optimizer's collectives (--shard-optimizer, ZeRO stage 1).

Rank r owns the contiguous slice share(n, r, P) of the flat parameter vector: it keeps
the optimizer state of that slice only, and updates only it. The gradient sync
reduce-scatters each bucket [lo, hi) onto the owners of its elements (the counts are
the bucket's overlaps with the slices, many of them zero), so the reduced gradient of
its slice lands on each rank; after the update an all-gather gives every rank all the
parameters. On the wire this is what the Allreduce moves (MPICH's Allreduce of large
messages is a reduce-scatter and an all-gather); the update's arithmetic and the
optimizer's memory are 1/P of the replicated ones.

Checkpoints keep the replicated format: the state is gathered on rank 0 (gather) and,
on resume, spread from rank 0 (scatter), so a run resumes with or without sharding,
on any number of ranks.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI
from mpi4py.util.dtlib import from_numpy_dtype

from mpinn.comm.collectives import complete
from mpinn.comm.world import Comm


class Shards:
    """The slices of n elements over the ranks of comm."""

    def __init__(self, comm: Comm, n: int) -> None:
        self.comm, self.n = comm, n
        q, r = divmod(n, comm.size)
        self.counts = [q + (k < r) for k in range(comm.size)]
        self.starts = [k * q + min(k, r) for k in range(comm.size)]
        self.lo = self.starts[comm.rank]
        self.hi = self.lo + self.counts[comm.rank]

    def overlaps(self, lo: int, hi: int) -> list[int]:
        """Elements of [lo, hi) in each rank's slice."""
        return [max(0, min(hi, s + c) - max(lo, s)) for s, c in zip(self.starts, self.counts)]

    def reduce_scatter(self, part: np.ndarray, lo: int, into: np.ndarray) -> MPI.Request:
        """Start the SUM of every rank's part (elements [lo, lo + len(part))) onto the
        owners: this rank's overlap lands in into (its slice's gradient) at its place."""
        hi = lo + len(part)
        a, b = max(lo, self.lo) - self.lo, max(min(hi, self.hi) - self.lo, 0)
        mine = into[a:max(a, b)]
        return self.comm.Ireduce_scatter(part, mine, self.overlaps(lo, hi), op=MPI.SUM)

    def all_gather(self, full: np.ndarray, what: str) -> None:
        """In place: every rank's slice of full, from its owner, to every rank."""
        complete(self.comm, self.comm.Iallgatherv(
            MPI.IN_PLACE, [full, self.counts, self.starts, from_numpy_dtype(full.dtype)]),
            what)

    def gather(self, part: np.ndarray, what: str) -> np.ndarray:
        """The full array on rank 0 from every rank's slice (elsewhere: part itself)."""
        full = np.zeros(self.n, part.dtype) if self.comm.rank == 0 else part
        recv = [full, self.counts, self.starts, from_numpy_dtype(part.dtype)] \
            if self.comm.rank == 0 else None
        complete(self.comm, self.comm.Igatherv(part, recv, root=0), what)
        return full

    def scatter(self, full: np.ndarray | None, part: np.ndarray, what: str) -> None:
        """part <- this rank's slice of rank 0's full array."""
        send = [full, self.counts, self.starts, from_numpy_dtype(part.dtype)] \
            if self.comm.rank == 0 else None
        complete(self.comm, self.comm.Iscatterv(send, part, root=0), what)
