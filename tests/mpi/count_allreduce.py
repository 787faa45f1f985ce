"""Run under mpiexec -n P: count the gradient Allreduces of a real training run.

A thin wrapper around COMM_WORLD records every Allreduce, blocking or not (buffer
address and size), and forwards it to MPI. Every step must sync the gradient buffer
in the same Allreduces (one with --sync blocking; with overlap, buckets of 1 kB at
least), which tile it exactly, always on the same memory; nothing else is per step.
Usage: count_allreduce.py DATA.h5 RUN_DIR BATCH EPOCHS SYNC
"""

import sys
from collections import Counter

import numpy as np

from mpinn.comm import console, exits, world
from mpinn.data import layout as data
from mpinn.data import sampler
from mpinn.nn import fixed
from mpinn.run.resolve import resolve
from mpinn.train.loop import train


class CountingComm:
    def __init__(self, comm):
        self._comm = comm
        self.calls = []

    def record(self, recvbuf):
        arr = np.asarray(recvbuf)
        self.calls.append((arr.__array_interface__["data"][0], arr.nbytes))

    def Allreduce(self, sendbuf, recvbuf, op):
        self.record(recvbuf)
        return self._comm.Allreduce(sendbuf, recvbuf, op=op)

    def Iallreduce(self, sendbuf, recvbuf, op):
        self.record(recvbuf)
        return self._comm.Iallreduce(sendbuf, recvbuf, op=op)

    def __getattr__(self, name):
        return getattr(self._comm, name)


def main() -> int:
    path, out, batch, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    comm = CountingComm(world.start())
    cfg = resolve({}, {"data": path, "out": out, "hidden": "16,8", "batch_size": batch,
                       "epochs": epochs, "overwrite": True, "sync": sys.argv[5],
                       "bucket_mb": 0.0004})
    summary = train(cfg, comm)
    info = data.describe(path)
    steps = epochs * sampler.steps_per_epoch(info.n_train, batch)
    assert summary["steps"] == steps
    grad_bytes = summary["allreduce_bytes_per_step"]
    # the buckets: the (address, size) calls made at every step (metrics: per epoch)
    counts = Counter(comm.calls)
    grad_calls = [c for c in comm.calls if counts[c] >= steps]
    per_step = len(grad_calls) // steps
    assert len(grad_calls) == steps * per_step, (len(grad_calls), steps)
    pattern = grad_calls[:per_step]
    assert all(grad_calls[k * per_step:(k + 1) * per_step] == pattern for k in range(steps))
    assert sum(n for _, n in pattern) == grad_bytes  # they tile the buffer
    assert sorted(pattern, reverse=True) == pattern  # from its end
    others = [c for c in comm.calls if c not in grad_calls]
    # only small metric reductions: sums of loss, correct, rows, flags, the evaluation
    # loss's limbs and the C x C confusion counts (float64), once per epoch
    small = 8 * (2 + fixed.LIMBS + info.outputs ** 2)
    assert all(nbytes <= small for _, nbytes in others), others
    assert len(others) <= 4 * epochs + 4, len(others)  # per epoch, not per step
    console.print0(comm, f"allreduce ok: {steps} steps, {per_step} gradient Allreduces each")
    return 0


sys.exit(exits.run_or_abort(world.start(), main))
