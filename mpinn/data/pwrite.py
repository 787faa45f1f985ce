"""Writing one dataset file, serially or from many ranks at once.

Rows are produced in fixed blocks of `block_rows`; rank r of P produces the
blocks share(n_blocks, r, P) of each split, so the content never depends on P.
Datasets are contiguous and allocated when created, so every row has a fixed
byte offset and the file's size is known before any row: rank 0 creates the
file with the serial HDF5 driver, reserves its whole size on disk (a full disk
is found here, before the first row: base/hdf5.py) and closes it. Then two ways
to put the rows there:

- `independent` (any h5py): all ranks write their rows' raw bytes with
  collective MPI-IO (MPI_File_write_at_all) at those offsets. HDF5 itself never
  sees two writers.
- `mpio` (parallel h5py): all ranks open the file with the mpio driver and
  write their rows with collective H5Dwrite calls.

A write can fail on one rank alone (its part of the disk, its quota). Every
collective step is followed by an agreement on every rank's status
(collectives.all_try), so an error ends the write on all ranks together, with
one message and exit 1, and no rank is left in a collective that another has
abandoned; the cleanup after an agreed failure is collective only because all
ranks are then known to be at it.

The file is written under a temporary name in the destination directory and
renamed into place by rank 0 once every rank has finished, so `path` is never
a half-written file; a rank that fails, or learns of a failure, removes the
temporary file (also before an abort).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

import h5py
import numpy as np

from mpinn.base.console import say
from mpinn.base.errors import CollectiveError, StorageError, UsageError
from mpinn.base.files import check_writable, commit, remove_quietly, temp_path
from mpinn.base.hdf5 import HDF5_FAILURES
from mpinn.base.reserved import allocated, create_reserved, hdf5_write_errors, new_hdf5
from mpinn.comm import collectives, exits, mpiio
from mpinn.comm.world import Comm
from mpinn.data import probe
from mpinn.data.readers import row_selection
from mpinn.data.sampler import ceil_div, share


@dataclass(frozen=True)
class SplitSpec:
    rows: int
    features: int
    y_shape: tuple[int, ...]
    y_dtype: str


# produce(split, block index, rows) -> (x rows, y rows)
Producer = Callable[[str, int, int], tuple[np.ndarray, np.ndarray]]


def create_datasets(f: h5py.File, specs: dict[str, SplitSpec], attrs: dict) -> None:
    """Contiguous x and y of every split, allocated now (fixed offsets), and attributes."""
    for split, spec in specs.items():
        g = f.create_group(split)
        allocated(g, "x", (spec.rows, spec.features), "float32")
        allocated(g, "y", (spec.rows, *spec.y_shape), spec.y_dtype)
    f.attrs.update(attrs)


def my_blocks(rows: int, block_rows: int, rank: int, size: int) -> tuple[range, int]:
    """This rank's block indices of a split, and how many write rounds every rank makes."""
    n_blocks = ceil_div(rows, block_rows)
    lo, hi = share(n_blocks, rank, size)
    return range(lo, hi), ceil_div(n_blocks, size)


def write_serial(path: str, specs: dict[str, SplitSpec], attrs: dict, produce: Producer,
                 block_rows: int) -> None:
    """The dataset file at path, written by this process alone."""
    check_writable(path)
    with new_hdf5(path, lambda f: create_datasets(f, specs, attrs)) as f:
        for split, spec in specs.items():
            for block, start in enumerate(range(0, spec.rows, block_rows)):
                x, y = produce(split, block, min(block_rows, spec.rows - start))
                f[split]["x"][start:start + len(x)] = x
                f[split]["y"][start:start + len(x)] = y
    probe.trust(path)  # written whole, by us: no probe of it before it is read


def write_parallel(comm: Comm, path: str, io: str, specs: dict[str, SplitSpec],
                   attrs: dict, produce: Producer, block_rows: int) -> None:
    """Collective: write the dataset file at path (see the module docstring)."""

    def prepare() -> str:
        check_writable(path)
        return temp_path(path)
    tmp = collectives.broadcast_object(comm, collectives.root_tries(comm, prepare))
    try:
        offsets = collectives.broadcast_object(comm, collectives.root_tries(
            comm, lambda: _create(tmp, path, specs, attrs)))
        if io == "mpio":
            _write_mpio(comm, tmp, path, specs, produce, block_rows)
        else:
            _write_mpiio(comm, tmp, path, specs, offsets, produce, block_rows)
        # every rank has closed the file (the close was agreed on): rank 0 renames it
        collectives.root_tries(comm, lambda: (commit(tmp, path), probe.trust(path)))
    except BaseException:  # agreed or not: whichever rank gets here removes the file
        remove_quietly(tmp)  # (local, as everything on an error path must be)
        raise


def _create(tmp: str, path: str, specs: dict[str, SplitSpec], attrs: dict) -> dict:
    """Rank 0: the file with its datasets, reserved; the byte offset of each dataset (an
    empty dataset has no storage, hence no offset, and gets no writes)."""
    create_reserved(tmp, path, lambda f: create_datasets(f, specs, attrs))
    with h5py.File(tmp, "r") as f:
        return {s: (f[s]["x"].id.get_offset(), f[s]["y"].id.get_offset()) for s in specs}


def _rounds(comm: Comm, specs: dict[str, SplitSpec], produce: Producer, block_rows: int):
    """(split, first row, x, y) per write round; ranks with no block left yield rows = 0."""
    for split, spec in specs.items():
        blocks, rounds = my_blocks(spec.rows, block_rows, comm.rank, comm.size)

        def make(i: int, split=split, spec=spec, blocks=blocks) -> tuple:
            if i >= len(blocks):
                return (0, np.zeros((0, spec.features), np.float32),
                        np.zeros((0, *spec.y_shape), spec.y_dtype))
            start = blocks[i] * block_rows
            return (start, *produce(split, blocks[i], min(block_rows, spec.rows - start)))
        for i in range(rounds):
            # bad input met producing rows (an import's NaN) ends every rank alike
            start, x, y = collectives.all_try(comm, make, i)
            yield split, start, np.ascontiguousarray(x), np.ascontiguousarray(y)


def _write_mpiio(comm, tmp, path, specs, offsets, produce, block_rows) -> None:
    """The rows, by collective MPI-IO writes at their byte offsets (any h5py)."""
    # (if the open fails on some ranks only, the others keep a handle they cannot close
    # alone: the command ends at once anyway)
    fh = collectives.all_try(comm, mpiio.open_for_writing, comm, tmp, path)
    try:
        for split, start, x, y in _rounds(comm, specs, produce, block_rows):
            x_at, y_at = offsets[split]
            row_x = specs[split].features * 4
            row_y = y.itemsize * int(np.prod(specs[split].y_shape))
            for at, buf in ((x_at + start * row_x, x), (y_at + start * row_y, y)):
                collectives.all_try(comm, mpiio.write_at_all, fh, at, buf, path)
    except (CollectiveError, UsageError):  # agreed: every rank is here, so the close can
        with contextlib.suppress(StorageError):  # be collective
            mpiio.close_file(fh, path)
        raise
    collectives.all_try(comm, mpiio.close_file, fh, path)


def _write_mpio(comm, tmp, path, specs, produce, block_rows) -> None:
    """The rows, by collective H5Dwrite calls through the mpio driver (parallel h5py)."""
    dxpl = h5py.h5p.create(h5py.h5p.DATASET_XFER)
    dxpl.set_dxpl_mpio(h5py.h5fd.MPIO_COLLECTIVE)

    def write(dset: h5py.Dataset, ranges: np.ndarray, buf: np.ndarray) -> None:
        mspace, fspace, buf = row_selection(dset, ranges, buf)
        with hdf5_write_errors(path):
            dset.id.write(mspace, fspace, buf, dxpl=dxpl)

    def close() -> None:
        with hdf5_write_errors(path):
            f.close()
    f = _open_mpio(comm, tmp, path)
    try:
        for split, start, x, y in _rounds(comm, specs, produce, block_rows):
            ranges = np.array([[start, start + len(x)]]) if len(x) else np.zeros((0, 2), int)
            for dset, buf in ((f[split]["x"], x), (f[split]["y"], y)):
                collectives.all_try(comm, write, dset, ranges, buf)
    except (CollectiveError, UsageError):  # agreed: every rank is here, so the close can
        with contextlib.suppress(StorageError, *HDF5_FAILURES):  # be collective
            f.close()
        raise
    collectives.all_try(comm, close)


def _open_mpio(comm: Comm, tmp: str, path: str) -> h5py.File:
    """Collective: tmp opened by every rank with the mpio driver, or a CollectiveError on
    every rank. Where it opened on some ranks only, those cannot close it (the close is
    collective, and h5py would try at exit): they end the job instead."""
    f, failure = None, None
    try:
        with hdf5_write_errors(path):
            f = h5py.File(tmp, "r+", driver="mpio", comm=comm)
    except StorageError as exc:
        failure = str(exc)
    failure = collectives.first_error(comm, failure)
    if failure is not None and f is not None:
        say(f"mpinn: failed: {failure}", sys.stderr)
        exits.abort(comm)
    if failure is not None:
        raise CollectiveError(failure)
    return f
