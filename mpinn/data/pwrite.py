"""Writing one dataset file from many ranks at once.

Rows are produced in fixed blocks of `block_rows`; rank r of P produces the
blocks share(n_blocks, r, P) of each split, so the content never depends on P.
Datasets are contiguous and allocated when created, so every row has a fixed
byte offset. Two ways to put the bytes there:

- `independent` (any h5py): rank 0 creates the file and its datasets with the
  serial HDF5 driver and closes it; then all ranks write their rows' raw bytes
  with collective MPI-IO (MPI_File_write_at_all) at those offsets. HDF5 itself
  never sees two writers.
- `mpio` (parallel h5py): all ranks open the file with the mpio driver and
  write their rows with collective H5Dwrite calls.

The file is written under a temporary name in the destination directory and
renamed into place by rank 0 once every rank has finished, so `path` is never
a half-written file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import h5py
import numpy as np

from mpinn.base.files import check_writable, temp_path
from mpinn.comm import collectives, mpiio
from mpinn.comm.world import Comm
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
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    for split, spec in specs.items():
        g = f.create_group(split)
        g.create_dataset("x", (spec.rows, spec.features), "float32", dcpl=dcpl)
        g.create_dataset("y", (spec.rows, *spec.y_shape), spec.y_dtype, dcpl=dcpl)
    f.attrs.update(attrs)


def my_blocks(rows: int, block_rows: int, rank: int, size: int) -> tuple[range, int]:
    """This rank's block indices of a split, and how many write rounds every rank makes."""
    n_blocks = ceil_div(rows, block_rows)
    lo, hi = share(n_blocks, rank, size)
    return range(lo, hi), ceil_div(n_blocks, size)


def write_parallel(comm: Comm, path: str, io: str, specs: dict[str, SplitSpec],
                   attrs: dict, produce: Producer, block_rows: int) -> None:
    """Collective: write the dataset file at path (see the module docstring)."""

    def prepare() -> str:
        check_writable(path)
        return temp_path(path)
    tmp = collectives.broadcast_object(comm, collectives.root_tries(comm, prepare))
    if io == "mpio":
        _write_mpio(comm, tmp, specs, attrs, produce, block_rows)
    else:
        _write_mpiio(comm, tmp, specs, attrs, produce, block_rows)
    collectives.barrier(comm)  # every rank's bytes are in the file
    if comm.rank == 0:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    collectives.barrier(comm)


def _rounds(comm: Comm, specs: dict[str, SplitSpec], produce: Producer, block_rows: int):
    """(split, first row, x, y) per write round; ranks with no block left yield rows = 0."""
    for split, spec in specs.items():
        blocks, rounds = my_blocks(spec.rows, block_rows, comm.rank, comm.size)
        for i in range(rounds):
            if i < len(blocks):
                start = blocks[i] * block_rows
                x, y = produce(split, blocks[i], min(block_rows, spec.rows - start))
            else:
                start = 0
                x = np.zeros((0, spec.features), np.float32)
                y = np.zeros((0, *spec.y_shape), spec.y_dtype)
            yield split, start, np.ascontiguousarray(x), np.ascontiguousarray(y)


def _write_mpiio(comm, tmp, specs, attrs, produce, block_rows) -> None:
    offsets = None
    if comm.rank == 0:
        with h5py.File(tmp, "w") as f:
            create_datasets(f, specs, attrs)
            # (an empty dataset has no storage, hence no offset, and gets no writes)
            offsets = {s: (f[s]["x"].id.get_offset(), f[s]["y"].id.get_offset()) for s in specs}
    offsets = collectives.broadcast_object(comm, offsets)
    fh = mpiio.open_for_writing(comm, tmp)
    try:
        for split, start, x, y in _rounds(comm, specs, produce, block_rows):
            x_at, y_at = offsets[split]
            row_x = specs[split].features * 4
            row_y = y.itemsize * int(np.prod(specs[split].y_shape))
            mpiio.write_at_all(fh, x_at + start * row_x, x)
            mpiio.write_at_all(fh, y_at + start * row_y, y)
    finally:
        mpiio.close_file(fh)


def _write_mpio(comm, tmp, specs, attrs, produce, block_rows) -> None:
    dxpl = h5py.h5p.create(h5py.h5p.DATASET_XFER)
    dxpl.set_dxpl_mpio(h5py.h5fd.MPIO_COLLECTIVE)
    with h5py.File(tmp, "w", driver="mpio", comm=comm) as f:
        create_datasets(f, specs, attrs)  # collective: every rank makes the same calls
        for split, start, x, y in _rounds(comm, specs, produce, block_rows):
            ranges = np.array([[start, start + len(x)]]) if len(x) else np.zeros((0, 2), int)
            for dset, buf in ((f[split]["x"], x), (f[split]["y"], y)):
                mspace, fspace, buf = row_selection(dset, ranges, buf)
                dset.id.write(mspace, fspace, buf, dxpl=dxpl)
