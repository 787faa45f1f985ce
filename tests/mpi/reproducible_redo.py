"""--reproducible's redo: a value past its grid on ONE rank makes every rank redo the
step on wider grids, and the weights come out as on one rank.

    mpiexec -n P python reproducible_redo.py OUT.npz
        # 4 steps of a global batch of 30 rows (rank r: its contiguous share); at step
        # 3, one row (held by the last rank) is scaled by 64, past every grid's headroom
Rank 0 writes the weights, the grid exponents and the redo count to OUT.npz; every
rank checks that all ranks counted the same redos.
"""

import sys

import numpy as np

from mpinn.comm import world
from mpinn.comm.gradsync import GradientSync
from mpinn.data.feed import Batch
from mpinn.data.layout import DatasetInfo, Problem
from mpinn.data.sampler import share
from mpinn.nn.exact import ExactMLP
from mpinn.nn.fixed import Budget
from mpinn.nn.model import Architecture
from mpinn.nn.optim import make_optimizer
from mpinn.train.step import Learner, train_step
from mpinn.train.timing import PhaseTimer

ROWS, STEPS, SPIKE_STEP = 30, 4, 2

comm = world.start()
arch = Architecture((6, 16, 3), "tanh", "cross-entropy", "float64")
sync = GradientSync(comm, arch.n_params, arch.dtype, "overlap", 800, exact=4)
model = ExactMLP(arch, ROWS, Budget.plan(arch.sizes, ROWS), seen=sync.extremes[:-1],
                 grads=sync.grads)
model.init(np.random.default_rng(7))
learner = Learner(model, make_optimizer("adam", model.params, 0.05, 0.0, 0.0), sync,
                  Problem(DatasetInfo("-", ROWS, 0, 6, "classification", 3), 3))
rng = np.random.default_rng(1)
x, y = rng.standard_normal((ROWS, 6)).astype(np.float32), rng.integers(0, 3, ROWS)
lo, hi = share(ROWS, comm.rank, comm.size)
redos_before = []
for step in range(STEPS):
    xs = x.copy()
    if step == SPIKE_STEP:
        xs[ROWS - 1] *= 64  # the last rank's row: past the input grid's 2x headroom
    redos_before.append(learner.redos[0])
    result = train_step(learner, Batch.in_memory(xs[lo:hi], y[lo:hi], ROWS, step),
                        PhaseTimer())
    assert result.applied
counts = comm.allgather(learner.redos[0])
assert len(set(counts)) == 1, f"ranks redid different numbers of steps: {counts}"
spike = learner.redos[0] - redos_before[SPIKE_STEP]
if comm.rank == 0:
    np.savez(sys.argv[1], params=model.params, grids=model.grid_e, redos=learner.redos[0],
             spike=spike, m=learner.optimizer.m)
    print(f"ok redos {learner.redos[0]} (at the spike: {spike})")
