"""The gradient sync: the step's one Allreduce of all gradients and a few control slots."""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from mpinn.comm.collectives import complete
from mpinn.comm.world import Comm

CONTROL_SLOTS = 3  # loss, stop, bad input: after the gradients, in the same buffer


class GradientSync:
    """The step's one Allreduce: all gradients, then a few control slots, in one buffer.

        buffer = [ grads (n_params) | loss | stop | bad input ]

    Before the call each rank writes the summed loss of its rows, whether it was
    asked to stop (a signal), and whether its rows held non-finite input. One
    in-place SUM then gives every rank the gradient summed over the global batch,
    the batch's summed loss, and how many ranks want to stop or met bad input:
    the ranks agree on all of it without a second collective, at the same step.
    The model's gradient vector is `grads`, a view (the model stays free of MPI).
    """

    LOSS, STOP, BAD_INPUT = range(CONTROL_SLOTS)

    def __init__(self, comm: Comm, n_params: int, dtype: np.dtype | str) -> None:
        self.comm = comm
        self.buffer = np.zeros(n_params + CONTROL_SLOTS, dtype)
        self.grads = self.buffer[:n_params]
        self.control = self.buffer[n_params:]
        self.sq_norm = 0.0  # of the reduced gradient sum, set by finite()

    def allreduce(self, loss: float, stop: bool = False, bad_input: bool = False) -> None:
        """In place: gradients and control slots <- their sums over all ranks."""
        self.control[:] = (loss, stop, bad_input)
        complete(self.comm, self.comm.Iallreduce(MPI.IN_PLACE, self.buffer, op=MPI.SUM),
                 "the gradient Allreduce")

    @property
    def stop_requested(self) -> bool:
        return bool(self.control[self.STOP] > 0)

    @property
    def bad_input(self) -> bool:
        return bool(self.control[self.BAD_INPUT] > 0)

    @property
    def loss(self) -> float:
        """The loss summed over the global batch (after allreduce)."""
        return float(self.control[self.LOSS])

    def finite(self) -> bool:
        """Whether the reduced loss and every reduced gradient are finite.

        A NaN or inf on any rank makes the sums NaN or inf on all ranks, so all
        ranks reach the same verdict. The dot product reads the gradient once and
        allocates nothing (|g|^2 overflows only for gradients beyond ~1e19 in
        float32, ~1e154 in float64: divergence by any measure).
        """
        self.sq_norm = float(np.dot(self.grads, self.grads))  # |g|^2, reused by --clip-norm
        return bool(np.isfinite(self.control[self.LOSS]) and np.isfinite(self.sq_norm))
