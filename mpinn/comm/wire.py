"""The gradient sync in half precision (--sync-dtype float16|bfloat16): half the bytes
on the wire, and error feedback so that what a conversion loses is sent later, not lost.

A bucket of n gradient elements, on P ranks, is cut into P chunks of c = ceil(n / P)
(the last padded with zeros); rank k owns chunk k. With s the step's scale (a power of
two: float16 has a narrow range), r this rank's residual and g its gradient sum:

    1. v = g + r (kept in r);  q = wire(s v)                          (one rounding)
    2. Ialltoall: rank k receives chunk k of every rank's q
    3. rank k sums its P chunks in float32, in rank order, and rounds the sum once:
       q2 = wire(sum)                                                 (one rounding)
    4. Iallgather of the q2 chunks: every rank has the bucket's sum, g <- q2 / s

When the step is applied: r <- v - q / s (what the first rounding lost), and the owner
of a chunk adds (sum - q2) / s there (what the second lost), so the sum of all ranks'
residuals is what the reduced gradients still owe the float32 sum (EF-SGD). MPI moves
bytes only (no reduction in the wire dtype: MPICH's float16 SUM is slow and rounds
after every addition), so the sum is rounded twice whatever P is.

An overflow (a value beyond the wire dtype's range, a non-finite sum where every rank's
float32 gradient was finite) skips the step on every rank: the residuals keep the whole
v (nothing is lost), the scale halves. The scale of the next step is otherwise the
largest power of two that keeps 4 x the step's largest reduced value in range.
"""

from __future__ import annotations

import math
import time

import numpy as np
from mpi4py import MPI

from mpinn.base.errors import UsageError

WIRE_DTYPES = ("float16", "bfloat16")
HEADROOM = 4.0  # the reduced maximum times this stays within the wire dtype's range


def wire_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        try:
            import ml_dtypes  # NumPy's bfloat16
        except ImportError:
            raise UsageError("--sync-dtype bfloat16 needs the ml-dtypes package (pip install "
                             "ml-dtypes; `make install` has it); float16 needs nothing") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def largest(dtype: np.dtype) -> float:
    return 65504.0 if dtype == np.float16 else float(np.finfo(np.float32).max)


def sum_parts(parts: np.ndarray, out: np.ndarray) -> None:
    """out <- the float32 sum of the rows of parts (wire values), in row (rank) order:
    the same bits on every run."""
    np.copyto(out, parts[0], casting="unsafe")
    for part in parts[1:]:
        np.add(out, part, out=out, dtype=np.float32, casting="unsafe")


def undo_rounding(residual: np.ndarray, sent: np.ndarray, scale: float,
                  scratch: np.ndarray) -> None:
    """residual (v, of the elements sent) <- v - q / s: what the rounding to q lost."""
    q = scratch[:len(sent)]
    np.multiply(sent, 1.0 / scale, out=q, dtype=q.dtype, casting="unsafe")
    residual -= q


class WireBucket:
    """One bucket's buffers (made once, reused every step) and its two stages."""

    def __init__(self, lo: int, hi: int, size: int, rank: int, wire: np.dtype) -> None:
        self.lo, self.hi, self.size, self.rank = lo, hi, size, rank
        n = hi - lo
        self.c = max(1, math.ceil(n / size))
        self.send = np.zeros(size * self.c, wire)
        self.recv = np.zeros(size * self.c, wire)
        self.gathered = np.zeros(size * self.c, wire)
        self.part = np.zeros(self.c, np.float32)  # the owner's float32 sum of its chunk
        self.mine = self.gathered[rank * self.c:(rank + 1) * self.c]  # q2, in place
        self.request: MPI.Request | None = None
        self.stage = 0  # 1: all-to-all in flight, 2: all-gather in flight, 3: done
        self.cast_s = 0.0  # this step's seconds in the conversions and the local sum

    def start(self, comm, residual: np.ndarray, grads: np.ndarray, scale: float) -> None:
        """Stage 1: v = g + r (into r), q = wire(s v), the all-to-all."""
        began = time.perf_counter()
        lo, hi = self.lo, self.hi
        r = residual[lo:hi]
        r += grads[lo:hi]
        np.multiply(r, scale, out=self.send[:hi - lo], dtype=r.dtype, casting="unsafe")
        self.cast_s = time.perf_counter() - began
        u16 = MPI.UINT16_T  # MPI moves the bytes: no arithmetic in the wire dtype
        self.request = comm.Ialltoall([self.send.view(np.uint16), u16],
                                      [self.recv.view(np.uint16), u16])
        self.stage = 1

    def reduce(self, comm) -> None:
        """Stage 2 (the all-to-all done): the owner's float32 sum of its chunk, rounded
        once, then the all-gather."""
        began = time.perf_counter()
        sum_parts(self.recv.reshape(self.size, self.c), self.part)
        np.copyto(self.mine, self.part, casting="unsafe")
        self.cast_s += time.perf_counter() - began
        u16 = MPI.UINT16_T
        self.request = comm.Iallgather(MPI.IN_PLACE, [self.gathered.view(np.uint16), u16])
        self.stage = 2

    def decode(self, grads: np.ndarray, scale: float) -> None:
        """The reduced bucket into grads: q2 / s."""
        began = time.perf_counter()
        out = grads[self.lo:self.hi]  # (computed in the gradient's dtype: q2 / s may
        np.multiply(self.gathered[:self.hi - self.lo], 1.0 / scale, out=out,  # exceed the
                    dtype=out.dtype, casting="unsafe")  # wire's range)
        self.stage = 3
        self.cast_s += time.perf_counter() - began

    def commit(self, residual: np.ndarray, scale: float, scratch: np.ndarray) -> None:
        """The step was applied: r <- v - q / s; the owner adds (sum - q2) / s."""
        n = self.hi - self.lo
        undo_rounding(residual[self.lo:self.hi], self.send[:n], scale, scratch)
        first = self.rank * self.c
        count = max(0, min(self.c, n - first))
        if count:
            lost = scratch[:count]
            np.copyto(lost, self.mine[:count], casting="unsafe")
            np.subtract(self.part[:count], lost, out=lost)
            lost *= 1.0 / scale
            residual[self.lo + first:self.lo + first + count] += lost


class ShardBucket(WireBucket):
    """With --shard-optimizer: a bucket's rounded values go to the owners of their
    elements (an all-to-all of each owner's overlap with the bucket, the contiguous
    slices of shards.py), and each owner sums its P parts in float32, in rank order,
    into its slice of the gradient: one rounding (each rank's), no all-gather of
    gradients (the updated parameters are all-gathered in the model's dtype)."""

    def __init__(self, lo: int, hi: int, shards, wire: np.dtype) -> None:
        self.lo, self.hi, self.size = lo, hi, shards.comm.size
        self.rank = shards.comm.rank
        self.counts = shards.overlaps(lo, hi)  # elements of each owner in the bucket
        self.displs = np.r_[0, np.cumsum(self.counts)[:-1]].astype(int).tolist()
        self.c = self.counts[self.rank]  # this rank's elements of the bucket
        self.at = max(lo, shards.lo) - shards.lo  # ... where they go in its slice
        self.send = np.zeros(hi - lo, wire)
        self.recv = np.zeros(self.size * self.c, wire)
        self.part = np.zeros(self.c, np.float32)
        self.request, self.stage, self.cast_s = None, 0, 0.0

    def start(self, comm, residual: np.ndarray, grads: np.ndarray, scale: float) -> None:
        began = time.perf_counter()
        r = residual[self.lo:self.hi]
        r += grads[self.lo:self.hi]
        np.multiply(r, scale, out=self.send, dtype=r.dtype, casting="unsafe")
        self.cast_s = time.perf_counter() - began
        u16 = MPI.UINT16_T
        self.request = comm.Ialltoallv(
            [self.send.view(np.uint16), self.counts, self.displs, u16],
            [self.recv.view(np.uint16), [self.c] * self.size,
             [k * self.c for k in range(self.size)], u16])
        self.stage = 1

    def reduce_into(self, own: np.ndarray, scale: float) -> None:
        """The all-to-all done: own[at:at + c] <- (sum of the P parts) / s."""
        began = time.perf_counter()
        sum_parts(self.recv.reshape(self.size, self.c), self.part)
        out = own[self.at:self.at + self.c]
        np.multiply(self.part, 1.0 / scale, out=out, dtype=out.dtype, casting="unsafe")
        self.stage = 3
        self.cast_s += time.perf_counter() - began

    def decode(self, grads: np.ndarray, scale: float) -> None:
        """Nothing: the owner's sum went into its slice (reduce_into)."""

    def commit(self, residual: np.ndarray, scale: float, scratch: np.ndarray) -> None:
        """The step was applied: r <- v - q / s (the only rounding)."""
        undo_rounding(residual[self.lo:self.hi], self.send, scale, scratch)


class WireSync:
    """The half-precision sync's state: residual, scale, buckets (gradsync.py drives it)."""

    def __init__(self, n_params: int, dtype: np.dtype, wire: str, rank: int, size: int
                 ) -> None:
        self.wire = wire_dtype(wire)
        self.rank, self.size = rank, size
        self.residual = np.zeros(n_params, dtype)
        self.scratch = np.zeros(0, dtype)
        self.scale = 1.0
        self.halvings = 0  # overflows so far: each halves the scale for good
        self.buckets: dict[tuple[int, int], WireBucket] = {}
        self.overflowed = False

    def bucket(self, lo: int, hi: int, shards=None) -> WireBucket:
        """The bucket [lo, hi)'s buffers (made at its first use); shards: sharded."""
        found = self.buckets.get((lo, hi))
        if found is None:
            found = self.buckets[(lo, hi)] = ShardBucket(lo, hi, shards, self.wire) \
                if shards is not None else WireBucket(lo, hi, self.size, self.rank, self.wire)
            if len(self.scratch) < hi - lo:
                self.scratch = np.zeros(hi - lo, self.residual.dtype)
        return found

    def end_step(self, used: list[WireBucket], applied: bool, overflow: bool,
                 top: float) -> None:
        """After the update (or its skip): the residuals and the next scale (top: the
        step's max |reduced gradient sum|)."""
        self.overflowed = overflow
        if overflow:  # nothing of the step was applied: the residuals keep all of v
            self.halvings += 1
            self.scale /= 2
            return
        if not applied:
            return
        for b in used:
            b.commit(self.residual, self.scale, self.scratch)
        self.scale = self.next_scale(top)

    def next_scale(self, top: float) -> float:
        """The largest power of two that keeps HEADROOM x top in range, over
        2 ** halvings (float16; bfloat16 has float32's range: 1)."""
        if self.wire != np.float16:
            return 1.0
        if not top > 0 or not math.isfinite(top):
            return self.scale
        exponent = math.floor(math.log2(largest(self.wire) / (HEADROOM * top)))
        return 2.0 ** (min(exponent, 24) - self.halvings)

    def wire_bytes(self, used: list[WireBucket]) -> int:
        """Bytes each rank sends in a step's buckets: P - 1 chunks out in the all-to-all,
        its own chunk to P - 1 ranks in the all-gather (sharded: all but its own part
        out, no all-gather)."""
        item = self.wire.itemsize
        return sum(((b.hi - b.lo - b.c) if isinstance(b, ShardBucket)
                    else 2 * (self.size - 1) * b.c) for b in used) * item
