"""Backward's panels computed while messages are in flight: a panel runs in a worker
thread (BLAS releases the GIL) and the calling thread, which makes every MPI call, tests
the messages TESTS times every TEST_EVERY seconds. MPI moves a message only inside MPI
calls; a panel takes milliseconds, which would leave a network link idle between two
tests, and smaller panels would slow the GEMMs (model.PANEL_ELEMENTS)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

TEST_EVERY = 0.001  # seconds between tests while a panel computes (0.5 ms slowed backward
#                     more on the lab, for no less exposed sync: docs/performance.md)
TESTS = 4  # tests each time: one test moves one step of a message (UCX over TCP: about
#            one 64 KB segment), so tested once a millisecond a 2 MB Allreduce over 1 Gbit/s
#            took 37.5 ms, 2.2x its blocking time; tested 4 times, 17.2 ms (1.03x)


class PanelRunner:
    """One worker thread, made when first needed, for backward's panels."""

    def __init__(self) -> None:
        self._worker: ThreadPoolExecutor | None = None

    def run(self, work: Callable[[], None], test: Callable[[], bool]) -> None:
        """work() in the worker while test() runs here TESTS times every TEST_EVERY
        seconds, until it says nothing is in flight; then test() once more. The panel's
        exception, if any, is raised here."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, "mpinn-backward")
        job = self._worker.submit(quietly, work)
        try:
            in_flight = True  # (all() stops at the test that finds nothing in flight)
            while in_flight and not wait((job,), timeout=TEST_EVERY).done:
                in_flight = all(test() for _ in range(TESTS))
        finally:  # (a failed test: the panel still ends before anything else runs)
            wait((job,))
        job.result()
        test()


def quietly(work: Callable[[], None]) -> None:
    """work() with NumPy's floating-point warnings off, as the training loop has them
    (a divergence is the guard's business; a worker thread has its own settings)."""
    with np.errstate(all="ignore"):
        work()
