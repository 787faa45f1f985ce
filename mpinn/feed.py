"""The batches of one epoch for this rank, read ahead while the current step computes.

A Feed walks an EpochPlan (sampler.py) and yields (x, y, global_batch_rows) per
step. With prefetch, a background thread fills one of two batch slots while
the training loop computes on the other: the thread takes a free slot, reads
the next step's rows into it, and hands it over; the loop gives a slot back
when it asks for the next batch, so a slot is never overwritten while in use.
The seconds the loop spends waiting for a batch are the step's `data` phase.

In block mode the thread first loads the window (this rank's contiguous file
ranges for the next window of steps) into memory with one read, then gathers
each step's rows from it.

Thread safety: h5py serialises all HDF5 calls with one lock, and with the mpio
reader every read is an MPI collective. So while a Feed's thread runs, the
training loop makes no HDF5 calls (evaluation happens after close()), and the
mpio reader prefetches only if MPI granted MPI_THREAD_MULTIPLE.
"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np

from .readers import SplitReader
from .sampler import EpochPlan


class Buffers:
    """Preallocated memory of the feeds of one reader: two batch slots, one window."""

    def __init__(self, reader: SplitReader, max_rows: int, window_rows: int = 0) -> None:
        self.slots = [reader.buffers(max_rows) for _ in range(2)]
        self.window = reader.buffers(window_rows) if window_rows else None
        for buf in [b for slot in self.slots for b in slot] + list(self.window or ()):
            buf.fill(0)  # touch every page now, not during the first steps


class Feed:
    def __init__(self, reader: SplitReader, plan: EpochPlan, buffers: Buffers,
                 prefetch: bool, first_step: int = 0) -> None:
        """first_step > 0 continues an epoch (after a resume) from that step."""
        self.reader, self.plan, self.buffers = reader, plan, buffers
        self.prefetch = prefetch
        self.first_step = first_step
        self.wait_seconds = 0.0  # the loop waiting for data
        self.read_seconds = 0.0  # reading and gathering (in the thread, if prefetching)
        self._window_starts = {first: ranges for first, ranges in plan.windows}
        self._window_index: tuple[np.ndarray, np.ndarray] | None = None
        self._ready: queue.Queue = queue.Queue()
        self._free: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def __iter__(self):
        if self.prefetch:
            for slot in range(2):
                self._free.put(slot)
            self._thread = threading.Thread(target=self._produce, name="mpinn-prefetch",
                                            daemon=True)
            self._thread.start()
        previous = None
        for step in range(self.first_step, len(self.plan)):
            start = time.perf_counter()
            if self.prefetch:
                if previous is not None:
                    self._free.put(previous)
                item = self._ready.get()
                if isinstance(item, BaseException):
                    raise item
                previous, x, y = item
            else:
                x, y = self._fill(step, 0)
            self.wait_seconds += time.perf_counter() - start
            yield x, y, int(self.plan.batch_rows[step])
        self.close()

    def close(self) -> None:
        """Stop and join the thread (idempotent); no HDF5 call is in flight afterwards.

        Stopping after step k, every rank's thread still reads step k+1 (its slot
        is already free) and then meets the sentinel: all ranks make the same
        reads, which the mpio reader needs (each read is a collective). A stop
        flag checked by the thread would race with that read on some ranks only.
        """
        if self._thread is not None:
            self._free.put(None)
            self._thread.join()
            self._thread = None

    def _produce(self) -> None:
        try:
            for step in range(self.first_step, len(self.plan)):
                slot = self._free.get()
                if slot is None:
                    return
                self._ready.put((slot, *self._fill(step, slot)))
        except BaseException as exc:  # handed to the training loop, which raises it
            self._ready.put(exc)

    def _fill(self, step: int, slot: int) -> tuple[np.ndarray, np.ndarray]:
        start = time.perf_counter()
        x_buf, y_buf = self.buffers.slots[slot]
        indices = self.plan.steps[step]
        if step in self._window_starts:
            self._load_window(self._window_starts[step])
        elif step == self.first_step and self.plan.windows:  # resumed inside a window
            self._load_window(max((w for w in self.plan.windows if w[0] <= step),
                                  key=lambda w: w[0])[1])
        if self._window_index is None:
            x, y = self.reader.read(indices, x_buf, y_buf)
        else:
            starts, offsets = self._window_index
            span = np.searchsorted(starts, indices, side="right") - 1
            positions = offsets[span] + (indices - starts[span])
            wx, wy = self.buffers.window
            x, y = x_buf[:len(indices)], y_buf[:len(indices)]
            # mode="clip": positions are in range by construction, and the default
            # mode="raise" gathers into a temporary and copies it (a batch per step)
            np.take(wx, positions, axis=0, out=x, mode="clip")
            np.take(wy, positions, axis=0, out=y, mode="clip")
        self.read_seconds += time.perf_counter() - start
        return x, y

    def _load_window(self, ranges: np.ndarray) -> None:
        """This rank's file ranges of the next window into the window buffer, in order."""
        lengths = ranges[:, 1] - ranges[:, 0] if len(ranges) else np.zeros(0, np.int64)
        rows = int(lengths.sum())
        wx, wy = self.buffers.window
        self.reader.read_ranges(ranges, wx[:rows], wy[:rows])
        starts = ranges[:, 0] if len(ranges) else np.zeros(0, np.int64)
        self._window_index = (starts, np.r_[0, np.cumsum(lengths)[:-1]].astype(np.int64))
