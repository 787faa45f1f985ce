"""Block shuffle's windows for one rank and one epoch: each window's contiguous file
ranges read, in window order, into one of two window buffers, from which the feed
gathers every step's rows (feed.py).

Without prefetch a window is read when its first step needs it. With prefetch a loader
thread reads window w+1 into the other buffer while window w is served, so that the
large reads overlap training instead of stalling the first step of every window; the
feed gives a buffer back once the last step of its window is gathered. All file reads
of a block-shuffle epoch are this one thread's, in window order (collectives, with mpio).
An exception of the loader reaches whoever waits for that window, or the feed's close.
"""

from __future__ import annotations

import queue
import threading

import numpy as np

from mpinn.data.readers import SplitReader
from mpinn.data.sampler import EpochPlan


class Windows:
    def __init__(self, reader: SplitReader, plan: EpochPlan,
                 buffers: list[tuple[np.ndarray, np.ndarray]], first_step: int) -> None:
        """The windows of `plan` from the one holding first_step on (after a resume a
        window starts at first_step: it holds the rest of its steps)."""
        self.reader, self.plan, self.buffers = reader, plan, buffers
        starts = [first for first, _ in plan.windows]
        self._first = max((w for w, f in enumerate(starts) if f <= first_step), default=0)
        self._starts = set(starts[self._first:]) | ({first_step} if starts else set())
        # the window served: its buffer, its ranges' starts and offsets in the buffer, number
        self._current: tuple[int, np.ndarray, np.ndarray, int] | None = None
        self._ready: queue.Queue = queue.Queue()
        self._free: queue.Queue = queue.Queue()
        self._loader: threading.Thread | None = None
        self.error: BaseException | None = None  # the loader's, until a step is given it

    def __bool__(self) -> bool:
        """Whether the plan has windows (block shuffle)."""
        return bool(self.plan.windows)

    def start_loader(self) -> None:
        """Read the windows ahead, in a thread of their own (prefetch)."""
        for buffer in range(2):
            self._free.put(buffer)
        self._loader = threading.Thread(target=self._load_all, name="mpinn-windows",
                                        daemon=True)
        self._loader.start()

    def close(self) -> None:
        """Stop and join the loader (idempotent)."""
        if self._loader is not None:
            self._free.put(None)
            self._loader.join()
            self._loader = None

    def gather(self, step: int, indices: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        """The rows `indices` of step `step` from its window into x and y (their length)."""
        if step in self._starts:
            self._advance()
        assert self._current is not None, "a step before the first window"
        buffer, starts, offsets, _ = self._current
        span = np.searchsorted(starts, indices, side="right") - 1
        positions = offsets[span] + (indices - starts[span])
        wx, wy = self.buffers[buffer]
        # mode="clip": positions are in range by construction, and the default
        # mode="raise" gathers into a temporary and copies it (a batch per step)
        np.take(wx, positions, axis=0, out=x, mode="clip")
        np.take(wy, positions, axis=0, out=y, mode="clip")

    def _advance(self) -> None:
        """Switch to the next window: loaded by the loader thread, or here and now."""
        if self._loader is None:
            number = self._first if self._current is None else self._current[-1] + 1
            self._current = (*self._load(number, 0), number)
            return
        item = self._ready.get()
        if isinstance(item, BaseException):
            if item is self.error:
                self.error = None  # delivered to the step that needs the window
            raise item
        if self._current is not None:
            self._free.put(self._current[0])  # its last gather is done
        self._current = item

    def _load_all(self) -> None:
        try:
            for number in range(self._first, len(self.plan.windows)):
                buffer = self._free.get()
                if buffer is None:
                    return
                self._ready.put((*self._load(number, buffer), number))
        except BaseException as exc:  # handed on to whoever waits for the window
            self.error = self.error or exc
            self._ready.put(exc)

    def _load(self, number: int, buffer: int) -> tuple[int, np.ndarray, np.ndarray]:
        """This rank's file ranges of window `number` into a window buffer, in order."""
        ranges = self.plan.windows[number][1]
        lengths = ranges[:, 1] - ranges[:, 0] if len(ranges) else np.zeros(0, np.int64)
        rows = int(lengths.sum())
        wx, wy = self.buffers[buffer]
        self.reader.read_ranges(ranges, wx[:rows], wy[:rows])
        starts = ranges[:, 0] if len(ranges) else np.zeros(0, np.int64)
        return buffer, starts, np.r_[0, np.cumsum(lengths)[:-1]].astype(np.int64)
