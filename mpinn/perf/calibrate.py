"""A sweep's calibration for the cost model (costmodel.py), run by `mpinn scaling run`
through the sweep's own launcher before its points, so that it sees the same hosts,
placement and transports:

    SWEEP_DIR/calibration/step-p<P>.json   mpinn bench step at P ranks: the sweep's model,
                                           dtype and optimizer, with --local-batches
                                           around the rows per rank its points train
                                           (all P ranks compute at once, as in training:
                                           ranks on one host slow each other down)
    SWEEP_DIR/calibration/comm.json        mpinn bench comm at the largest P (if > 1):
                                           alpha and beta of each transport, gamma, and
                                           the Allreduce against MPICH's algorithms, up
                                           to a few times the gradient buffer's size

The report predicts every point from these files and the point's placement; it never
looks at the point's own timings to do so. A file already there is kept (a sweep run
again continues); --overwrite starts afresh.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable

from mpinn.base.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from mpinn.comm.gradsync import CONTROL_SLOTS
from mpinn.nn.model import Architecture

DIRECTORY = "calibration"
SMALLEST_SIZE, LARGEST_SIZE = 1 << 16, 1 << 26  # bench comm's largest message: its bounds
COMM_BUDGET = "0.1"  # seconds per measurement of bench comm
STEP_STEPS = "50"
MAX_ROWS = 1 << 16  # bench step --local-batches takes rows per rank up to this


def step_file(sweep_dir: str, ranks: int) -> str:
    return os.path.join(sweep_dir, DIRECTORY, f"step-p{ranks}.json")


def comm_file(sweep_dir: str) -> str:
    return os.path.join(sweep_dir, DIRECTORY, "comm.json")


def gradient_bytes(sizes: tuple[int, ...], dtype: str) -> int:
    """The bytes of the step's Allreduce: every weight and bias, and the control slots."""
    itemsize = 8 if dtype == "float64" else 4
    return (Architecture(sizes, dtype=dtype).n_params + CONTROL_SLOTS) * itemsize


def local_batches(rows: set[int]) -> list[int]:
    """The rows per rank to time: those the points train, half the fewest and twice the
    most (a fit needs two sizes, and a projection goes beyond them)."""
    wanted = rows | {max(1, min(rows) // 2), 2 * max(rows)}
    kept = sorted(r for r in wanted if r <= MAX_ROWS)  # bench step's bound
    return kept if len(kept) >= 2 else [MAX_ROWS // 2, MAX_ROWS]


def comm_max_bytes(nbytes: int) -> int:
    """bench comm's largest message: the first power of 4 at or above twice the buffer,
    within 64 KiB .. 64 MiB."""
    power = 4 ** math.ceil(math.log(max(2 * nbytes, 1), 4))
    return min(max(power, SMALLEST_SIZE), LARGEST_SIZE)


def commands(sweep_dir: str, sizes: tuple[int, ...], dtype: str, optimizer: str,
             batches: dict[int, list[int]]) -> list[tuple[str, int, list[str]]]:
    """(file, ranks, mpinn arguments) of each benchmark; batches: the global batches of
    the points at each rank count."""
    # bench step trains a classifier: one regression target is timed as two outputs (a
    # column more in the last layer; the buffer the Allreduce moves is the run's own)
    model = ["--features", str(sizes[0]), "--hidden", ",".join(map(str, sizes[1:-1])),
             "--classes", str(max(2, sizes[-1])), "--dtype", dtype]
    found = []
    for ranks, globals_ in sorted(batches.items()):
        rows = {math.ceil(b / ranks) for b in globals_}
        found.append((step_file(sweep_dir, ranks), ranks, [
            "bench", "step", *model, "--optimizer", optimizer, "--steps", STEP_STEPS,
            "--batch-size", str(max(globals_)),
            "--local-batches", ",".join(map(str, local_batches(rows)))]))
    top = max(batches)
    if top > 1:
        found.append((comm_file(sweep_dir), top, [
            "bench", "comm", "--budget", COMM_BUDGET,
            "--max-bytes", str(comm_max_bytes(gradient_bytes(sizes, dtype)))]))
    return found


def calibrate(sweep_dir: str, planned: list[tuple[str, int, list[str]]],
              launch: Callable[[list[str], int, str], int], note: Callable[[str], None]) -> int:
    """Run the benchmarks whose files are missing, each through launch(argv, ranks, log);
    returns the first non-zero status."""
    os.makedirs(os.path.join(sweep_dir, DIRECTORY), exist_ok=True)
    for path, ranks, args in planned:
        name = os.path.relpath(path, sweep_dir)
        if os.path.exists(path):
            note(f"[calibration] {name}: measured before, kept")
            continue
        note(f"[calibration] {name}: mpinn {' '.join(args[:2])} at {ranks} rank"
            f"{'s' if ranks > 1 else ''}")
        log = path[:-len(".json")] + ".log"
        status = launch([sys.executable, "-m", "mpinn", *args, "--json", path], ranks, log)
        if status == EXIT_USAGE:  # refused (oversubscribed, say): its points will say so too
            note(f"[calibration] {name} refused to run (exit 2; its log: {log}): no "
                f"prediction at {ranks} rank{'s' if ranks > 1 else ''}")
        elif status != EXIT_OK:
            return status
        elif not os.path.exists(path):
            note(f"[calibration] {name}: the launcher ended with exit 0 but wrote no results")
            return EXIT_FAILED
    return EXIT_OK
