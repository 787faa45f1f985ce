"""--trace FILE: a timeline of the run in Chrome's trace-event JSON (opens in Perfetto,
ui.perfetto.dev, or chrome://tracing).

One process per rank (named by rank and host), with a thread per kind of work:

    step            each step, and inside it its phases (data, forward, backward,
                    allreduce: the wait for the sync after backward, update)
    bucket K        bucket K's gradient Allreduce, from its start to its completion as
                    the first successful test saw it (buckets are in flight together,
                    so each has its own thread)
    read-ahead      the feed's reads of the next batches (its own thread in the run)
    checkpoint      checkpoint writes (rank 0 writes; every rank takes part)

Events are kept for the first and the last --trace-steps steps only, so a file's size
is bounded however long the run. Every rank records with its own clock; at the start
the ranks estimate each one's offset to rank 0's (the median of a few exchanges right
after a barrier), and rank 0 writes the file with every event on its clock, at the end
of the run and at a stop (the ranks agree on both, so the gather meets every rank).
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from mpinn.base.files import write_atomically
from mpinn.comm import collectives, world
from mpinn.comm.gradsync import GradientSync
from mpinn.comm.world import Comm

STEP_TID, READ_TID, CHECKPOINT_TID, BUCKET_TID = 1, 2, 3, 10
THREADS = {STEP_TID: "step", READ_TID: "read-ahead", CHECKPOINT_TID: "checkpoint"}
CLOCK_ROUNDS = 5

Event = tuple[str, int, float, float]  # name, thread, start, end (this rank's seconds)


class Trace:
    """This rank's events of the first and last `keep` steps (see the module docstring)."""

    def __init__(self, comm: Comm, path: str, keep: int) -> None:
        """Collective: the ranks' clock offsets are measured here."""
        self.comm, self.path, self.keep = comm, path, keep
        self.offset = clock_offset(comm)  # add to this rank's times: rank 0's clock
        self.first: list[Event] = []
        self.last: collections.deque[list[Event]] = collections.deque(maxlen=keep)
        self.current: list[Event] = []
        self.other: list[Event] = []  # outside steps: checkpoints, reads between epochs
        self.steps = 0

    def phase(self, name: str, start: float, end: float) -> None:
        """A phase of the step (PhaseTimer's observer)."""
        self.current.append((name, STEP_TID, start, end))

    def read(self, step: int, start: float, end: float) -> None:
        """A batch's read (the feed's observer; from its read-ahead thread)."""
        self.current.append((f"read step {step + 1}", READ_TID, start, end))

    @contextmanager
    def span(self, name: str, tid: int) -> Iterator[None]:
        """Work outside the steps (checkpoints), kept whatever the step."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.other.append((name, tid, start, time.perf_counter()))

    def end_step(self, step: int, start: float, sync: GradientSync) -> None:
        """Close a step: its own event, its buckets' Allreduces, and what it recorded."""
        self.current.append((f"step {step}", STEP_TID, start, time.perf_counter()))
        for k, (sent, done) in enumerate(sync.bucket_times):
            lo, hi = sync.buckets[k]
            mb = (hi - lo) * sync.buffer.itemsize / 1e6
            self.current.append((f"Allreduce {mb:.2f} MB", BUCKET_TID + k, sent, done))
        if self.steps < self.keep:
            self.first.extend(self.current)
        else:
            self.last.append(self.current)
        self.current = []
        self.steps += 1

    def write(self) -> None:
        """Collective: rank 0 writes every rank's events, on its clock, to the file."""
        mine = self.first + [e for step in self.last for e in step] + self.other
        events = [(n, t, s + self.offset, e + self.offset) for n, t, s, e in mine]
        gathered = collectives.gather_objects(self.comm, (world.processor_name(), events),
                                              "the gather of the trace")
        collectives.root_tries(self.comm, lambda: write_atomically(
            self.path, json.dumps(trace_json(gathered)).encode()))


def trace_json(ranks: list[tuple[str, list[Event]]]) -> dict:
    """Chrome trace-event JSON of every rank's events (complete events, microseconds)."""
    origin = min((s for _, events in ranks for _, _, s, _ in events), default=0.0)
    out = []
    for rank, (host, events) in enumerate(ranks):
        out.append({"ph": "M", "name": "process_name", "pid": rank,
                    "args": {"name": f"rank {rank} ({host})"}})
        out.append({"ph": "M", "name": "process_sort_index", "pid": rank,
                    "args": {"sort_index": rank}})
        for tid in sorted({t for _, t, _, _ in events} | set(THREADS)):
            name = THREADS.get(tid, f"bucket {tid - BUCKET_TID + 1}")
            out.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": tid,
                        "args": {"name": name}})
        for name, tid, start, end in sorted(events, key=lambda e: (e[1], e[2], -e[3])):
            out.append({"ph": "X", "name": name, "pid": rank, "tid": tid,
                        "ts": round((start - origin) * 1e6, 3),
                        "dur": round(max(0.0, end - start) * 1e6, 3)})
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def clock_offset(comm: Comm) -> float:
    """Collective: seconds to add to this rank's perf_counter to get rank 0's (the median
    of CLOCK_ROUNDS readings taken right after a barrier; within the barrier's skew)."""
    offsets = []
    for _ in range(CLOCK_ROUNDS):
        collectives.barrier(comm, "the trace's clock alignment")
        now = np.array([time.perf_counter()])
        collectives.broadcast(comm, reference := now.copy(), what="the trace's clock")
        offsets.append(float(reference[0] - now[0]))
    return float(np.median(offsets))
