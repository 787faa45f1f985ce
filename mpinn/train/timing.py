"""Phase timers for the training step and their statistics across ranks.

Each rank accumulates seconds per phase; after training, the per-rank means
per step are reduced (mean and max over ranks: the max is what the job waits
for). The reduction itself goes through comm/ like every MPI call. The first
step of a run warms caches and BLAS: end_step() leaves it out of every figure.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np

from mpinn.comm import collectives
from mpinn.comm.world import Comm

PHASES = ("data", "forward", "backward", "allreduce", "update", "allgather")  # (the last:
# --shard-optimizer's all-gather of the updated parameters; 0 without it)


class PhaseTimer:
    """Accumulated wall seconds per phase over counted steps."""

    def __init__(self, phases: tuple[str, ...] = PHASES) -> None:
        self.phases = phases
        self.seconds = np.zeros(len(phases))
        self.steps = 0  # steady-state steps timed
        self.steady_seconds = 0.0  # their wall time, and the global batch rows they trained
        self.steady_samples = 0
        self.warm = False  # whether the first (warm-up) step is behind
        self.sync_seconds = 0.0  # the gradient sync in flight, first send to completion
        self.trace: Callable[[str, float, float], None] | None = None  # told every phase
        self._index = {p: i for i, p in enumerate(phases)}
        self.step_start = time.perf_counter()

    def begin_step(self) -> None:
        self.step_start = time.perf_counter()

    def end_step(self, samples: int) -> None:
        """Count a step of `samples` global rows; the first one only resets the timers."""
        if not self.warm:
            self.warm = True
            self.reset()
            return
        self.steps += 1
        self.steady_seconds += time.perf_counter() - self.step_start
        self.steady_samples += samples

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            end = time.perf_counter()
            self.seconds[self._index[name]] += end - start
            if self.trace is not None:
                self.trace(name, start, end)

    def add_sync(self, seconds: float) -> None:
        """A step's gradient sync was in flight this long (its exposed part is the
        "allreduce" phase: the wait after backward)."""
        self.sync_seconds += seconds

    def reset(self) -> None:
        self.seconds[:] = 0
        self.sync_seconds = 0.0
        self.steps = 0

    def reduce(self, comm: Comm) -> dict[str, dict[str, float]]:
        """Collective: {phase: {"mean": s, "max": s}} of seconds per step over ranks."""
        return self.reduce_with_step(comm)[0]

    def reduce_with_step(self, comm: Comm
                         ) -> tuple[dict[str, dict[str, float]], dict[str, float] | None]:
        """Collective: the phases as reduce() gives them, and {"mean": s, "max": s} of the
        wall seconds per counted step (None if no step was counted)."""
        times = self.reduce_all(comm)
        return times.phases, times.step

    def reduce_all(self, comm: Comm) -> StepTimes:
        """Collective, in two reductions: {"mean": s, "max": s} over ranks of the seconds
        per counted step of each phase, of the whole step (the phases and what lies
        between them), and of the gradient sync in flight (add_sync)."""
        per_step = np.append(self.seconds, (self.steady_seconds, self.sync_seconds)) / max(
            self.steps, 1)
        total = per_step.copy()
        collectives.allreduce_sum(comm, total)
        peak = per_step.copy()
        collectives.allreduce_max(comm, peak)
        stats = [{"mean": float(t / comm.size), "max": float(m)} for t, m in zip(total, peak)]
        phases = dict(zip(self.phases, stats))
        return StepTimes(phases, stats[-2] if self.steps else None, stats[-1])


class StepTimes(NamedTuple):
    phases: dict[str, dict[str, float]]  # per phase
    step: dict[str, float] | None  # the whole step (None: no step counted)
    sync: dict[str, float]  # the gradient sync, first send to completion (overlaps backward)
