"""Progress within an epoch, reported by rank 0: step/steps, the epoch's running mean
loss, samples/s and the epoch's ETA.

    --progress bar    a live bar, redrawn in place (carriage return) five times a second
                      (or every --log-every seconds if that is shorter)
    --progress lines  a line every --log-every seconds (what a log file wants)
    --progress auto   bar when rank 0's stdout is a terminal, else lines (under mpiexec
                      output is piped, so a job logs lines)
    --progress off    nothing within an epoch

The loop calls `step` once per step with the batch's loss summed over ALL ranks (the
sync buffer's loss slot, already reduced by the step's Allreduce) and the global batch
rows: the running loss costs no collective. Between reports a step costs a clock read.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

BAR_SECONDS = 0.2  # a live bar is redrawn at most five times a second
BAR_WIDTH = 24


def resolve_mode(mode: str, stream: TextIO) -> str:
    """auto -> bar at a terminal, lines otherwise."""
    if mode != "auto":
        return mode
    try:
        return "bar" if os.isatty(stream.fileno()) else "lines"
    except (AttributeError, OSError, ValueError):  # a stream without a descriptor
        return "lines"


class EpochProgress:
    """The progress report of one epoch (rank 0 reports; the other ranks pass mode off)."""

    def __init__(self, mode: str, log_every: float, epoch: int, epochs: int, steps: int,
                 first_step: int = 0, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.mode = resolve_mode(mode, self.stream)
        self.interval = min(log_every, BAR_SECONDS) if self.mode == "bar" else log_every
        self.epoch, self.epochs, self.steps = epoch, epochs, steps
        self.first_step = first_step  # a resumed epoch starts past its beginning
        self.loss = 0.0  # summed over the epoch's global batches so far (this run)
        self.rows = 0
        self.began = time.perf_counter()
        self.due = self.began + self.interval
        self.drawn = False

    def step(self, done: int, batch_loss: float, batch_rows: int) -> None:
        """After step `done` (of steps) of the epoch: account for it, report if due."""
        if self.mode == "off":
            return
        self.loss += batch_loss
        self.rows += batch_rows
        now = time.perf_counter()
        if now >= self.due or (self.mode == "bar" and done == self.steps):
            self.due = now + self.interval
            self.report(done, now - self.began)

    def report(self, done: int, elapsed: float) -> None:
        rate = self.rows / elapsed if elapsed > 0 else 0.0
        steps_now = done - self.first_step
        eta = (self.steps - done) * elapsed / steps_now if steps_now else 0.0
        loss = self.loss / self.rows if self.rows else float("nan")
        text = (f"{done}/{self.steps} loss {loss:.4f}  {rate:,.0f} samples/s  "
                f"ETA {format_seconds(eta)}")
        if self.mode == "bar":
            filled = BAR_WIDTH * done // max(self.steps, 1)
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            self.write(f"\repoch {self.epoch + 1}/{self.epochs} [{bar}] {text}\x1b[K")
            self.drawn = True
        else:
            self.write(f"epoch {self.epoch + 1}/{self.epochs} step {text}\n")

    def end(self) -> None:
        """End the epoch's bar with a newline (the epoch's line follows)."""
        if self.drawn:
            self.write("\n")
            self.drawn = False

    def write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"
