"""The batches of one epoch for this rank, read ahead while the current step computes.

A Feed walks an EpochPlan (sampler.py) and yields a Batch per step: this rank's
rows x and y, the size of the global batch, their sample indices and micro-batches,
the global step, and, if a row holds a NaN or an infinity, a message naming it
(checked where the rows are read, so with prefetch the check costs the step
nothing). The Batch goes into the training step as it is (train/step.py).

With prefetch, a background thread fills one of two batch slots while the training
loop computes on the other: the thread takes a free slot, reads the next step's rows
into it, and hands it over; the loop gives a slot back when it asks for the next
batch, so a slot is never overwritten while in use. The seconds the loop spends
waiting for a batch are the step's `data` phase.

In block mode each step's rows are gathered from a window in memory (this
rank's contiguous file ranges for a window of steps: windows.py, whose loader
thread reads them ahead with prefetch).

Thread safety: h5py serialises all HDF5 calls with one lock, and with the mpio
reader every read is an MPI collective. So while a Feed's threads run, the
training loop makes no collective HDF5 calls (evaluation happens after
close(); rank 0's mid-epoch checkpoint writes are serial and take h5py's
lock), and the mpio reader prefetches only if MPI granted MPI_THREAD_MULTIPLE.
An exception in a thread reaches the loop when it asks for that batch, or at
close() if it never does, so a failed read-ahead still ends the job.

A read that fails (readers.ReadFailure: a corrupt file) is bad input, like a
non-finite row: the batch comes with no rows and the failure as its message,
every rank learns of it through the step's Allreduce, and all exit 2 together.
After it this feed reads nothing more. With the mpio reader every read is a
collective the other ranks are inside of, so there a failed read ends the job
(one line, exit 1) instead; and so does, with mpio, a failed read ahead that
no step asked for (with independent reads that one is dropped: no step needs it).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from mpinn.data.layout import nonfinite_message
from mpinn.data.readers import ReadFailure, SplitReader
from mpinn.data.sampler import EpochPlan
from mpinn.data.windows import Windows


class Batch(NamedTuple):
    x: np.ndarray  # this rank's rows of the step
    y: np.ndarray
    rows: int  # of the GLOBAL batch: what the summed gradient is divided by
    bad: str | None  # a non-finite row of this rank's share, named; None if all are finite
    index: np.ndarray  # the rows' sample indices in the split (dropout masks use them)
    micro: np.ndarray  # this rank's rows in each micro-batch, in order (accumulation)
    step: int = 0  # the global step it is for (dropout's key)

    @classmethod
    def in_memory(cls, x: np.ndarray, y: np.ndarray, rows: int, step: int = 0) -> Batch:
        """A batch of rows held in memory (benchmarks): rows of a global batch of `rows`."""
        return cls(x, y, rows, None, np.arange(len(x)), np.array([len(x)]), step)


class Buffers:
    """Preallocated memory of the feeds of one reader: two batch slots, two windows."""

    def __init__(self, reader: SplitReader, max_rows: int, window_rows: int = 0) -> None:
        self.max_rows = max_rows  # a step's rows on this rank, at most
        self.slots = [reader.buffers(max_rows) for _ in range(2)]
        self.windows = [reader.buffers(window_rows) for _ in range(2)] if window_rows else []
        for pair in self.slots + self.windows:
            for buf in pair:
                buf.fill(0)  # touch every page now, not during the first steps


class Feed:
    def __init__(self, reader: SplitReader, plan: EpochPlan, buffers: Buffers,
                 prefetch: bool, first_step: int = 0, steps_before: int = 0) -> None:
        """first_step > 0 continues an epoch (after a resume) from that step;
        steps_before: the global steps of the epochs before (a batch's step counts on)."""
        self.reader, self.plan, self.buffers = reader, plan, buffers
        self.prefetch = prefetch
        self.first_step, self.steps_before = first_step, steps_before
        self.windows = Windows(reader, plan, buffers.windows, first_step)  # block shuffle
        self._ready: queue.Queue = queue.Queue()
        self._free: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None  # the prefetch thread's
        self._failed: str | None = None  # a read that failed: every later batch says so
        self.observe: Callable[[int, float, float], None] | None = None  # (step, start, end)
        #                                                   of each batch's read (a trace)

    def __len__(self) -> int:
        """Steps this feed delivers (from first_step to the epoch's end)."""
        return len(self.plan) - self.first_step

    def __iter__(self):
        if self.prefetch and self.windows:
            self.windows.start_loader()
        if self.prefetch:
            for slot in range(2):
                self._free.put(slot)
            self._thread = threading.Thread(target=self._produce, name="mpinn-prefetch",
                                            daemon=True)
            self._thread.start()
        previous = None
        for step in range(self.first_step, len(self.plan)):
            if self.prefetch:
                if previous is not None:
                    self._free.put(previous)
                item = self._ready.get()
                if isinstance(item, BaseException):
                    raise item
                previous, x, y, bad = item
            else:
                x, y, bad = self._fill(step, 0)
            index = self.plan.steps[step]
            micro = self.plan.micro[step] if self.plan.micro else np.array([len(index)])
            yield Batch(x, y, int(self.plan.batch_rows[step]), bad, index, micro,
                        self.steps_before + step)
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
        self.windows.close()  # after the batch thread: its releases come first
        error = self._error or self.windows.error
        if error is not None:  # a read ahead failed that no step asked for yet: raise it
            self._error = self.windows.error = None  # here, or (with mpio) the other ranks
            if self._collective or not isinstance(error, ReadFailure):  # would wait forever
                raise error  # in that read's collective

    @property
    def _collective(self) -> bool:
        return self.reader.file.io == "mpio"

    def _produce(self) -> None:
        try:
            for step in range(self.first_step, len(self.plan)):
                slot = self._free.get()
                if slot is None:
                    return
                self._ready.put((slot, *self._fill(step, slot)))
        except BaseException as exc:  # handed to the training loop, which raises it
            self._error = self._error or exc
            self._ready.put(exc)

    def _fill(self, step: int, slot: int) -> tuple[np.ndarray, np.ndarray, str | None]:
        """A step's rows into a slot, with a message if they are bad (see the docstring)."""
        x_buf, y_buf = self.buffers.slots[slot]
        if self._failed is not None:
            return x_buf[:0], y_buf[:0], self._failed
        began = time.perf_counter()
        try:
            x, y = self._gather(step, slot)
            if self.observe is not None:
                self.observe(self.steps_before + step, began, time.perf_counter())
        except ReadFailure as exc:
            if self._collective:
                raise
            self._failed = str(exc)
            return x_buf[:0], y_buf[:0], self._failed
        found = self.reader.nonfinite(x, y)
        if found is None:
            return x, y, None
        name, position = found
        row = int(self.plan.steps[step][position])
        return x, y, nonfinite_message(self.reader.file.path, self.reader.split, name, row)

    def _gather(self, step: int, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's rows of a step into a batch slot: read, or taken from the window."""
        x_buf, y_buf = self.buffers.slots[slot]
        indices = self.plan.steps[step]
        if not self.windows:
            return self.reader.read(indices, x_buf, y_buf)
        x, y = x_buf[:len(indices)], y_buf[:len(indices)]
        self.windows.gather(step, indices, x, y)
        return x, y
