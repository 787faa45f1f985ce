"""`mpinn data import`: a dataset file in mpinn's layout (layout.py) from a user's data.

    mpinn data import data.h5 --from mydata.csv --test-fraction 0.2 --standardize
    mpiexec -n 4 mpinn data import data.h5 --x X.npy --y Y.npy
    mpinn data import data.h5 --from their.h5 --x /features --y /labels
    mpinn data import new.h5 --from new.csv --like data.h5   # new rows, scored later

Sources: delimited text (tabular.py, two serial streaming passes: the first counts
the rows and classes, the second writes), and arrays (arrays.py: .npy pairs, .npz
members, HDF5 datasets), which all ranks write in parallel as `data synth` does
(pwrite.py: the file is the same whatever the number of ranks). Labels become
0..C-1, a split is stratified, inputs may be standardized with the training rows'
statistics (labels.py); a file imported --like another gets its label names and
statistics, and its rows go to the test split (new rows, to evaluate or predict).
Nothing is written where an input is bad: the output appears whole or not at all.
"""

from __future__ import annotations

import os
import sys
import time

import h5py
import numpy as np

from mpinn.base.console import say
from mpinn.base.errors import UsageError
from mpinn.base.files import check_writable
from mpinn.base.reserved import new_hdf5
from mpinn.comm import collectives
from mpinn.comm.world import Comm
from mpinn.data import probe, tabular
from mpinn.data.importarrays import import_arrays
from mpinn.data.importplan import ImportSpec, Like, Plan, attributes, read_like, summary_line
from mpinn.data.labels import Classes, Moments, Standardizer
from mpinn.data.pwrite import create_datasets


def run_import(comm: Comm, spec: ImportSpec) -> str:
    """Collective: write spec.out; returns what was written, in a line."""
    spec.check()
    collectives.root_tries(comm, lambda: check_writable(spec.out))
    like = collectives.broadcast_object(comm, collectives.root_tries(
        comm, lambda: read_like(spec.like))) if spec.like else None
    if spec.text:  # serial: rank 0 reads and writes, the others wait for its verdict
        return collectives.broadcast_object(comm, collectives.root_tries(
            comm, lambda: import_text(spec, like)))
    return import_arrays(comm, spec, like)


class Meter:
    """A progress line on stderr for long imports: rewritten in place on a terminal,
    a line every 10 s otherwise; silent for the first 2 s."""

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total, self.began, self.shown = what, total, time.monotonic(), 0.0

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        tty = os.isatty(2)
        if now - self.began < 2 or now - self.shown < (0.5 if tty else 10):
            return
        self.shown = now
        rate = done / (now - self.began) / 1e6
        line = (f"{self.what}: {100 * done / max(1, self.total):.0f}% ({done / 1e6:,.0f} of "
                f"{self.total / 1e6:,.0f} MB, {rate:.0f} MB/s)")
        if tty:
            sys.stderr.write(f"\r{line}\x1b[K")
            sys.stderr.flush()
        else:
            say(line, sys.stderr)

    def close(self) -> None:
        """End a line rewritten in place."""
        if self.shown and os.isatty(2):
            sys.stderr.write("\n")
            sys.stderr.flush()


def import_text(spec: ImportSpec, like: Like | None) -> str:
    """The serial import of CSV/TSV (module docstring)."""
    table = tabular.open_table(spec.source, spec.delimiter, spec.header, spec.label,
                               spec.columns)
    if like is not None and like.features != len(table.features):
        raise UsageError(f"{spec.source} has {len(table.features)} input columns but "
                         f"--like {spec.like} has {like.features} features")
    began = time.perf_counter()
    rows, classes = 0, Classes()
    meter = Meter(f"{spec.source}: counting rows and classes", table.size)
    for block in tabular.blocks(table, spec.regression, labels_only=True):  # pass 1
        meter(block.end)
        rows += len(block.y)
        if not spec.regression:
            classes.collect(block.y)
    meter.close()
    plan = Plan.make(spec, like, classes, rows)
    specs = plan.specs(len(table.features))
    scale = like.scale if like else None
    moments, shift = Moments(), None

    def layout(f: h5py.File) -> None:
        create_datasets(f, specs, attributes(spec, os.path.basename(spec.source), plan.names,
                                             scale, tuple(table.names[k] for k in table.features)
                                             if table.header else None))

    with new_hdf5(spec.out, layout) as f:
        at = {split: 0 for split in specs}
        meter = Meter(f"{spec.source}: writing {spec.out}", table.size)
        for block in tabular.blocks(table, spec.regression):  # pass 2
            meter(block.end)
            y = plan.targets(block.y, block.where)
            test = plan.test_mask(y)
            x = block.x
            if spec.standardize:  # shifted by the first row: float32 keeps the spread
                shift = x[0].copy() if shift is None else shift
                x = x - shift
                moments.add(x[~test])
            elif scale is not None:
                x = scale(x)
            for split, rows_in in (("train", ~test), ("test", test)):
                n = int(np.count_nonzero(rows_in))
                if n and split in specs:
                    f[split]["x"][at[split]:at[split] + n] = x[rows_in].astype(np.float32)
                    f[split]["y"][at[split]:at[split] + n] = y[rows_in]
                    at[split] += n
        meter.close()
        if any(at[s] != specs[s].rows for s in specs):
            raise UsageError(f"{spec.source} changed while it was imported")
        if spec.standardize:
            scale = standardize_in_place(f, specs, moments, shift)
    probe.trust(spec.out)  # written whole, by us
    seconds = time.perf_counter() - began
    rate = (f"; read {table.size / 1e6:,.1f} MB twice in {seconds:.1f} s "
            f"({table.size / 1e6 / seconds:,.0f} MB/s)" if table.size >= 10e6 else "")
    return summary_line(spec, plan, scale) + rate


def standardize_in_place(f: h5py.File, specs: dict, moments: Moments,
                         shift: np.ndarray) -> Standardizer:
    """x (stored as x - shift) <- (x - mean) / std with the training rows' statistics;
    the statistics (of x itself) become the file's input_mean and input_std."""
    centred = moments.standardizer()  # of x - shift
    for split in specs:
        x = f[split]["x"]
        for lo in range(0, len(x), 1 << 16):
            x[lo:lo + (1 << 16)] = centred(x[lo:lo + (1 << 16)].astype(np.float64))
    scale = Standardizer(centred.mean + shift, centred.std)
    f.attrs["input_mean"], f.attrs["input_std"] = scale.mean, scale.std
    return scale


