"""Phase timers for the training step and their statistics across ranks.

Each rank accumulates seconds per phase; after training, the per-rank means
per step are reduced (mean and max over ranks: the max is what the job waits
for). The reduction itself goes through comm/ like every MPI call. The first
step of a run warms caches and BLAS: end_step() leaves it out of every figure.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from mpinn.comm import collectives
from mpinn.comm.world import Comm

PHASES = ("data", "forward", "backward", "allreduce", "update")


class PhaseTimer:
    """Accumulated wall seconds per phase over counted steps."""

    def __init__(self, phases: tuple[str, ...] = PHASES) -> None:
        self.phases = phases
        self.seconds = np.zeros(len(phases))
        self.steps = 0  # steady-state steps timed
        self.steady_seconds = 0.0  # their wall time, and the global batch rows they trained
        self.steady_samples = 0
        self.warm = False  # whether the first (warm-up) step is behind
        self._index = {p: i for i, p in enumerate(phases)}
        self._step_start = time.perf_counter()

    def begin_step(self) -> None:
        self._step_start = time.perf_counter()

    def end_step(self, samples: int) -> None:
        """Count a step of `samples` global rows; the first one only resets the timers."""
        if not self.warm:
            self.warm = True
            self.reset()
            return
        self.steps += 1
        self.steady_seconds += time.perf_counter() - self._step_start
        self.steady_samples += samples

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[self._index[name]] += time.perf_counter() - start

    def reset(self) -> None:
        self.seconds[:] = 0
        self.steps = 0

    def reduce(self, comm: Comm) -> dict[str, dict[str, float]]:
        """Collective: {phase: {"mean": s, "max": s}} of seconds per step over ranks."""
        return self.reduce_with_step(comm)[0]

    def reduce_with_step(self, comm: Comm
                         ) -> tuple[dict[str, dict[str, float]], dict[str, float] | None]:
        """Collective: the phases as reduce() gives them, and {"mean": s, "max": s} of the
        wall seconds per counted step (the phases and what lies between them; None if no
        step was counted), in the same two reductions."""
        per_step = np.append(self.seconds, self.steady_seconds) / max(self.steps, 1)
        total = per_step.copy()
        collectives.allreduce_sum(comm, total)
        peak = per_step.copy()
        collectives.allreduce_max(comm, peak)
        phases = {p: {"mean": float(total[i] / comm.size), "max": float(peak[i])}
                  for i, p in enumerate(self.phases)}
        step = {"mean": float(total[-1] / comm.size), "max": float(peak[-1])}
        return phases, (step if self.steps else None)
