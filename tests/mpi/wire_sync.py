"""The half-precision gradient sync (comm/wire.py) against a NumPy model of the same
arithmetic, on every rank: per bucket, each rank's v = g + r rounded once to the wire
dtype, chunk k summed in float32 in rank order by rank k and rounded once, gathered,
divided by the scale; residuals r <- v - q / s plus, for a chunk's owner, what its
rounding lost. Also: error feedback (the applied sums plus the residuals equal the
float32 sums), an overflow (skipped on all ranks, scale halved, nothing lost).

    mpiexec -n P python wire_sync.py WIRE MODE [shard]
        # WIRE float16|bfloat16, MODE overlap|blocking; shard: --shard-optimizer's variant
        # (each owner sums its slice's parts once, no second rounding, no all-gather)
Prints one line "ok ..." from rank 0 or fails an assertion.
"""

import math
import sys

import numpy as np
from mpi4py import MPI

from mpinn.comm import world
from mpinn.comm.gradsync import GradientSync
from mpinn.comm.wire import wire_dtype

N, BUCKET_BYTES, STEPS = 10_007, 12_000, 6  # buckets of >= 3000 float32 elements


def gradients(step: int, rank: int) -> np.ndarray:
    rng = np.random.default_rng([step, rank])
    return (rng.standard_normal(N) * 30).astype(np.float32)


def model_bucket(gs, rs, lo, hi, size, scale, wire):
    """The NumPy model of one bucket: the reduced values and every rank's new residual."""
    n = hi - lo
    c = math.ceil(n / size)
    vs = [r[lo:hi] + g[lo:hi] for g, r in zip(gs, rs)]
    qs = [np.zeros(size * c, wire) for _ in vs]
    for q, v in zip(qs, vs):
        q[:n] = (v * np.float32(scale)).astype(wire)
    out = np.zeros(size * c, wire)
    lost = np.zeros(size * c, np.float32)
    for k in range(size):  # owner k's chunk
        part = qs[0][k * c:(k + 1) * c].astype(np.float32)
        for q in qs[1:]:
            part = part + q[k * c:(k + 1) * c].astype(np.float32)
        out[k * c:(k + 1) * c] = part.astype(wire)
        lost[k * c:(k + 1) * c] = (part - out[k * c:(k + 1) * c].astype(np.float32)) * \
            np.float32(1 / scale)
    for k, (r, v, q) in enumerate(zip(rs, vs, qs)):
        r[lo:hi] = v - q[:n].astype(np.float32) * np.float32(1 / scale)
        first = k * c
        count = max(0, min(c, n - first))
        r[lo + first:lo + first + count] += lost[first:first + count]
    return (out[:n].astype(np.float32) * np.float32(1 / scale))


def model_shard_bucket(gs, rs, lo, hi, scale, wire):
    """The sharded variant: the owners' sums (one rounding: each rank's), residuals."""
    qs = [(r[lo:hi] + g[lo:hi]) * np.float32(scale) for g, r in zip(gs, rs)]
    qs = [q.astype(wire) for q in qs]
    total = qs[0].astype(np.float32)
    for q in qs[1:]:
        total = total + q.astype(np.float32)
    for r, g, q in zip(rs, gs, qs):
        r[lo:hi] = (r[lo:hi] + g[lo:hi]) - q.astype(np.float32) * np.float32(1 / scale)
    return total * np.float32(1 / scale)


def run_step(sync, grads_all, overlap):
    comm = sync.comm
    sync.start(1.0)
    sync.grads[:] = grads_all[comm.rank]
    if overlap:  # backward's hooks, the last layer first: ready in slices of 1500
        for hi in range(N, 0, -1500):
            sync.ready(max(0, hi - 1500), hi)
            sync.progress()
    else:
        sync.front = 0
    sync.finish()
    return sync.finite()


def main() -> None:
    wire_name, mode, shard = sys.argv[1], sys.argv[2], sys.argv[3:] == ["shard"]
    comm = world.start()
    rank, size = comm.rank, comm.size
    wire = wire_dtype(wire_name)
    sync = GradientSync(comm, N, "float32", mode, BUCKET_BYTES, test_in_flight=True,
                        wire=wire_name, shard=shard)
    model = model_shard_bucket if shard else \
        (lambda gs, rs, lo, hi, scale, w: model_bucket(gs, rs, lo, hi, size, scale, w))
    rs = [np.zeros(N, np.float32) for _ in range(size)]
    total32, applied_sum = np.zeros(N, np.float64), np.zeros(N, np.float64)
    for step in range(STEPS):
        gs = [gradients(step, r) for r in range(size)]
        scale = sync.wire.scale
        assert run_step(sync, gs, mode == "overlap")
        bounds = sorted(sync.buckets)
        expected = np.zeros(N, np.float32)
        for lo, hi in bounds:
            expected[lo:hi] = model(gs, rs, lo, hi, scale, wire)
        got = np.concatenate(comm.allgather(sync.own)) if shard else sync.grads
        assert np.array_equal(got, expected), (step, scale, [
            (lo, hi, float(np.abs(got[lo:hi] - expected[lo:hi]).max())) for lo, hi in bounds])
        applied_sum += got
        total32 += np.sum(gs, axis=0, dtype=np.float64)
        sync.end_step(True)
        assert np.array_equal(sync.wire.residual, rs[rank]), step
        assert sync.wire.scale == comm.bcast(sync.wire.scale)  # alike on all ranks
    # error feedback: what was applied plus what is still owed is the float32 sum
    owed = np.zeros(N, np.float64)
    comm.Allreduce(sync.wire.residual.astype(np.float64), owed, op=MPI.SUM)
    tolerance = 1e-5 * np.abs(total32).max()
    assert np.abs(applied_sum + owed - total32).max() < tolerance
    one_step = np.abs(total32).max() * (1e-2 if wire_name == "bfloat16" else 1e-3)
    assert np.abs(applied_sum - total32).max() < one_step  # within one step's rounding
    # an overflow on one rank: skipped on all, the scale halves, the residuals keep v
    # (bfloat16 has float32's range: only a diverged gradient leaves it, which is
    # divergence, not an overflow)
    before, scale = sync.wire.residual.copy(), sync.wire.scale
    gs = [gradients(STEPS, r) for r in range(size)]
    gs[size - 1][5] = 1e30 if wire_name == "bfloat16" else 7e4 / scale
    finite = run_step(sync, gs, mode == "overlap")
    assert not finite
    assert sync.overflowed == (wire_name == "float16")
    sync.end_step(False)
    if wire_name == "float16":
        assert sync.wire.scale == scale / 2 and sync.wire.halvings == 1
        assert np.array_equal(sync.wire.residual, before + gs[rank])
    if rank == 0:
        print(f"ok {wire_name} {mode}{' shard' if shard else ''} P={size}: {STEPS} steps equal "
              f"to the model, buckets {len(sync.buckets)}")


if __name__ == "__main__":
    main()
