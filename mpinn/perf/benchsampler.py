"""`mpinn bench sampler --rows N`: what the sample order costs, on a virtual dataset of N
rows (no file): the epoch plan's memory and the time to draw each step's rows, for a
shuffle mode, on this rank's share of every global batch (run it under mpiexec)."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np

from mpinn.comm import collectives
from mpinn.comm.world import Comm
from mpinn.data.sampler import Sampling, epoch_plan, holdout, remaining
from mpinn.perf.bench import anonymous_memory, report


def bench_sampler(comm: Comm, rows: int, shuffle: str, batch: int, steps: int,
                  val_fraction: float, json_out: str | None) -> dict:
    """Collective: the memory the plan (and the hold-out) hold on each rank (what
    tracemalloc sees NumPy and Python allocate: not the allocator's reuse of freed
    memory, which an RSS difference would miss), the anonymous RSS it added, and the
    seconds per step to draw a step's rows (slowest rank)."""
    before = anonymous_memory()
    tracemalloc.start()
    began = time.perf_counter()
    held = holdout(0, rows, val_fraction, shuffle)
    train = None if shuffle == "feistel" else remaining(rows, held)
    plan = epoch_plan(Sampling(shuffle), 0, 1, rows, batch, comm.rank, comm.size,
                      rows=train, held=len(held))
    planned = time.perf_counter() - began
    kept = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    steps = min(steps, len(plan))
    picks = np.linspace(0, len(plan) - 1, steps).astype(int)  # across the epoch
    began = time.perf_counter()
    drawn = sum(len(plan.steps[int(k)]) for k in picks)
    per_step = (time.perf_counter() - began) / max(1, steps)
    figures = np.array([kept, anonymous_memory() - before, planned, per_step])
    collectives.allreduce_max(comm, figures)
    result = {"rows": rows, "shuffle": shuffle, "ranks": comm.size, "batch_size": batch,
              "val_fraction": val_fraction, "steps_drawn": steps, "rows_drawn_rank0": drawn,
              "plan_memory_bytes_per_rank": int(figures[0]),
              "plan_rss_bytes_per_rank": int(figures[1]), "plan_s": figures[2],
              "draw_s_per_step": figures[3]}
    text = (f"{shuffle} shuffle of {rows:,} rows ({comm.size} rank{'s' if comm.size > 1 else ''}"
            f", global batch {batch}{f', {val_fraction:g} held out' if val_fraction else ''})"
            f": the plan holds {figures[0] / 2**20:,.1f} MiB per rank and took "
            f"{1e3 * figures[2]:.1f} ms; a step's rows take {1e6 * figures[3]:,.0f} us to draw")
    return report(comm, result, text, json_out)
