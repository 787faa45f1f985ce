"""Reading a dataset's rows: two readers behind one interface.

- `independent`: every rank opens the file read-only with HDF5's serial driver
  and reads its own rows. Works with any h5py. A dataset stored contiguously
  and uncompressed (as mpinn writes them) is read directly at its file offset
  with plain POSIX reads: scattered rows are gathered from a read-only memory
  map (HDF5 costs ~15 us per selected row run, the gather ~0.05 us per row) and
  runs of rows are read with one pread each. Chunked or filtered datasets go
  through HDF5.
- `mpio`: the file is opened once by all ranks with h5py's `mpio` driver and
  every read is a COLLECTIVE MPI-IO call (H5FD_MPIO_COLLECTIVE): all ranks take
  part in every read, with an empty selection when they need no rows, so MPI-IO
  can merge the ranks' scattered requests into large contiguous ones. Needs an
  h5py built against parallel HDF5 (`make parallel-hdf5`).

Through HDF5, a read of many rows is ONE H5Dread per dataset: the rows are sorted and
coalesced into runs, the runs become one union-of-hyperslabs selection, and the
result is put back into the requested order in memory. The low-level API is
used because h5py's high-level indexing skips the HDF5 call for empty
selections, which would leave the other ranks waiting in a collective read.

A read that fails (HDF5 cannot decode a corrupt chunk, the file shrank) raises
ReadFailure, naming the file, the split, the rows and HDF5's reason, on the
rank that read. The feed (feed.py) turns it into bad input that all ranks agree
on at the step (exit 2). Anywhere else it ends the job with one line (exit 1,
MPI_Abort): a rank that cannot read must not leave the others waiting.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Iterator

import h5py
import numpy as np

from mpinn.base.errors import StorageError, UsageError
from mpinn.base.hdf5 import HDF5_FAILURES, NOT_HDF5, failure_reason, hdf5_errors
from mpinn.comm import mpiio
from mpinn.data.sampler import runs
from mpinn.nn.finite import nonfinite_row

IO_MODES = ("auto", "mpio", "independent")
# MPI-IO hints for reading. ROMIO's data sieving reads the whole extent between
# a rank's first and last row, and two-phase collective buffering has
# aggregators read whole file domains: for the scattered rows of a shuffled
# batch both read most of the file per step (measured here: 30 ms per
# collective read of 64 rows; 0.8 ms with both off). The reads stay collective
# calls (MPI_File_read_at_all); ROMIO then serves each rank's pieces directly.
# On a parallel file system with many ranks aggregation may pay off again:
# MPINN_MPIO_HINTS="romio_cb_read=enable,cb_nodes=8" replaces these defaults.
MPIO_READ_HINTS = {"romio_cb_read": "disable", "romio_ds_read": "disable"}


def mpio_read_hints() -> dict[str, str]:
    spec = os.environ.get("MPINN_MPIO_HINTS")
    if spec is None:
        return dict(MPIO_READ_HINTS)
    hints = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"MPINN_MPIO_HINTS: expected key=value, got {item!r}")
        hints[key.strip()] = value.strip()
    return hints
# HDF5's H5D_mpio_actual_io_mode_t, as reported after a read with the mpio driver
ACTUAL_IO_MODES = {0: "none", 1: "chunk-independent", 2: "chunk-collective", 3: "chunk-mixed",
                   4: "contiguous-collective"}


class ReadFailure(StorageError):
    """Rows of a dataset could not be read on this rank (a corrupt file, a file that
    shrank). A StorageError, so that where ranks cannot agree on it, it ends the job
    with one line (exits.run_or_abort); the feed agrees on it as bad input instead."""


def parallel_hdf5() -> bool:
    """Whether this h5py was built against parallel HDF5 (the `mpio` driver)."""
    return bool(h5py.get_config().mpi)


def resolve_io(io: str) -> str:
    """`auto` -> `mpio` if h5py has MPI, else `independent`; check an explicit `mpio`."""
    if io == "auto":
        return "mpio" if parallel_hdf5() else "independent"
    if io == "mpio" and not parallel_hdf5():
        raise UsageError("--io mpio needs h5py built with parallel HDF5 (h5py.get_config().mpi "
                         "is False here); build that environment with `make parallel-hdf5`, or "
                         "use --io independent")
    return io


class DataFile:
    """A dataset file opened for reading by every rank, serially or with MPI-IO."""

    def __init__(self, path: str, io: str, comm=None) -> None:
        self.io = io
        self.path = path
        with hdf5_errors(path, "the file"):
            self._open(path, io, comm)
        self.io_modes: dict[str, int] = {}  # actual MPI-IO mode -> number of reads
        self._readers: list[SplitReader] = []

    def _open(self, path: str, io: str, comm) -> None:
        if io == "mpio":
            self._file = h5py.File(path, "r", driver="mpio", comm=comm,
                                   info=mpiio.io_hints(mpio_read_hints()))
            self.dxpl = h5py.h5p.create(h5py.h5p.DATASET_XFER)
            self.dxpl.set_dxpl_mpio(h5py.h5fd.MPIO_COLLECTIVE)
        else:
            # A larger chunk cache than HDF5's 1 MiB for chunked files; contiguous
            # files (what mpinn writes) bypass it.
            self._file = h5py.File(path, "r", rdcc_nbytes=32 << 20, rdcc_nslots=100_003)
            self.dxpl = None

    def reader(self, split: str, max_rows: int) -> SplitReader:
        with hdf5_errors(self.path, f"/{split}/x and /{split}/y"):
            reader = SplitReader(self, split, max_rows)
        self._readers.append(reader)
        return reader

    def record_io_mode(self) -> None:
        with h5py._objects.phil:  # h5py's lock: HDF5 here is not thread-safe
            mode = actual_io_mode(self.dxpl)
        name = ACTUAL_IO_MODES.get(mode, "unknown") if mode is not None else "unknown"
        self.io_modes[name] = self.io_modes.get(name, 0) + 1

    def close(self) -> None:
        for reader in self._readers:
            for direct in reader._direct or ():
                direct.close()
        self._readers = []
        self._file.close()

    def __enter__(self) -> DataFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SplitReader:
    """Reads chosen rows of one split's x and y into caller-provided buffers."""

    def __init__(self, file: DataFile, split: str, max_rows: int) -> None:
        self.file = file
        self.split = split
        self.x = file._file[split]["x"]
        self.y = file._file[split]["y"]
        self.n = self.x.shape[0]
        self.features = self.x.shape[1]
        self.x_dtype, self.y_dtype = self.x.dtype, self.y.dtype
        self.y_shape = self.y.shape[1:]
        self._sorted_x, self._sorted_y = self.buffers(max_rows)
        self._direct = None  # (x, y) DirectDatasets, if both can be read directly
        if file.io == "independent":
            direct = (DirectDataset.open(file.path, self.x), DirectDataset.open(file.path, self.y))
            if direct[0] is not None and direct[1] is not None:
                self._direct = direct
        self.bytes_read = 0
        self.reads = 0
        self.read_seconds = 0.0  # inside file reads (not in-memory gathers of windows)

    def buffers(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Empty x and y buffers for `rows` rows of this split."""
        return (np.empty((rows, self.features), self.x_dtype),
                np.empty((rows, *self.y_shape), self.y_dtype))

    def nonfinite(self, x: np.ndarray, y: np.ndarray) -> tuple[str, int] | None:
        """('x' or 'y', position) of the first row read with a NaN or infinity, or None."""
        for name, values in (("x", x), ("y", y)):
            row = nonfinite_row(values) if values.dtype.kind == "f" else None
            if row is not None:
                return name, row
        return None

    def read(self, indices: np.ndarray, x_out: np.ndarray, y_out: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
        """Rows `indices` (unique, any order) into x_out[:n], y_out[:n]; returns those views.

        Collective with `mpio`: every rank calls it the same number of times.
        """
        began = time.perf_counter()
        try:
            with self.explained(indices):
                return self._read_rows(indices, x_out, y_out)
        finally:
            self.read_seconds += time.perf_counter() - began

    def _read_rows(self, indices: np.ndarray, x_out: np.ndarray, y_out: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
        n = len(indices)
        x, y = x_out[:n], y_out[:n]
        if n and int(indices[-1]) - int(indices[0]) == n - 1 and np.all(np.diff(indices) == 1):
            self._read_ranges(np.array([[indices[0], indices[-1] + 1]]), x, y)  # one run
            return x, y
        if self._direct is not None:
            self._direct[0].gather(indices, x)
            self._direct[1].gather(indices, y)
            self._count(n, x_out, y_out)
            return x, y
        if n and np.all(indices[1:] > indices[:-1]):  # already ascending: read in place
            self._read_ranges(runs(indices), x, y)
            return x, y
        order = np.argsort(indices, kind="stable")
        sx, sy = self._sorted_x[:n], self._sorted_y[:n]
        self._read_ranges(runs(indices[order]), sx, sy)
        x[order] = sx
        y[order] = sy
        return x, y

    def read_ranges(self, ranges: np.ndarray, x_out: np.ndarray, y_out: np.ndarray) -> None:
        """Rows of the [start, stop) ranges (ascending), concatenated, into x_out and y_out."""
        began = time.perf_counter()
        try:
            with self.explained(ranges):
                self._read_ranges(ranges, x_out, y_out)
        finally:
            self.read_seconds += time.perf_counter() - began

    @contextlib.contextmanager
    def explained(self, rows: np.ndarray) -> Iterator[None]:
        """A failed read of rows (row indices, or [start, stop) ranges) as a ReadFailure
        naming the rows it spans."""
        try:
            yield
        except NOT_HDF5:
            raise
        except HDF5_FAILURES as exc:
            last = int(rows.max()) - (rows.ndim == 2)  # a range's stop is exclusive
            span = f"rows {int(rows.min())} to {last} of " if rows.size else ""
            path = self.file.path
            raise ReadFailure(f"{path}: cannot read {span}/{self.split}/x and /{self.split}/y "
                              f"({failure_reason(exc)}); the file is probably corrupt "
                              f"(`mpinn data inspect --check {path}` reads every row)"
                              ) from None

    def _read_ranges(self, ranges: np.ndarray, x_out: np.ndarray, y_out: np.ndarray) -> None:
        rows = int((ranges[:, 1] - ranges[:, 0]).sum()) if len(ranges) else 0
        if self._direct is not None:
            self._direct[0].read_ranges(ranges, x_out)
            self._direct[1].read_ranges(ranges, y_out)
        else:
            self._read(self.x, ranges, x_out)
            self._read(self.y, ranges, y_out)
        self._count(rows, x_out, y_out)

    def _count(self, rows: int, x_out: np.ndarray, y_out: np.ndarray) -> None:
        self.bytes_read += rows * (x_out.itemsize * self.features
                                   + y_out.itemsize * int(np.prod(self.y_shape)))
        self.reads += 1

    def _read(self, dset: h5py.Dataset, ranges: np.ndarray, out: np.ndarray) -> None:
        collective = self.file.dxpl is not None
        if not len(ranges) and not collective:
            return
        mspace, fspace, out = row_selection(dset, ranges, out)
        dset.id.read(mspace, fspace, out, dxpl=self.file.dxpl)
        if collective:
            self.file.record_io_mode()


def row_selection(dset: h5py.Dataset, ranges: np.ndarray, buf: np.ndarray):
    """(memory space, file space, buffer) for the rows of [start, stop) ranges of dset.

    The file selection is one union of hyperslabs. With no rows, both
    selections are empty (and buf a 1-row dummy), so that a rank with nothing
    to move can still take part in a collective H5Dread/H5Dwrite.
    """
    rows = int((ranges[:, 1] - ranges[:, 0]).sum()) if len(ranges) else 0
    assert buf.shape[0] == rows and buf.flags.c_contiguous, (buf.shape, rows)
    tail = dset.shape[1:]
    fspace = dset.id.get_space()
    fspace.select_none()
    for start, stop in ranges:
        fspace.select_hyperslab((int(start),) + (0,) * len(tail), (int(stop - start),) + tail,
                                op=h5py.h5s.SELECT_OR)
    if rows == 0:
        buf = np.empty((1,) + tail, buf.dtype)
        mspace = h5py.h5s.create_simple(buf.shape)
        mspace.select_none()
    else:
        mspace = h5py.h5s.create_simple(buf.shape)
    return mspace, fspace, buf


class DirectDataset:
    """A contiguous, unfiltered dataset read without HDF5, at its file offset."""

    def __init__(self, path: str, dset: h5py.Dataset, offset: int) -> None:
        self.offset = offset
        self.row_bytes = dset.dtype.itemsize * int(np.prod(dset.shape[1:]))
        self.map = np.memmap(path, dtype=dset.dtype, mode="r", offset=offset, shape=dset.shape)
        self.fd = os.open(path, os.O_RDONLY)

    @classmethod
    def open(cls, path: str, dset: h5py.Dataset) -> DirectDataset | None:
        if dset.chunks is not None or dset.compression or dset.dtype.hasobject or not dset.size:
            return None
        offset = dset.id.get_offset()
        return None if offset is None else cls(path, dset, offset)

    def gather(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Scattered rows, in the given order, from the memory map."""
        np.take(self.map, rows, axis=0, out=out, mode="clip")  # no temporary (see feed.py)

    def read_ranges(self, ranges: np.ndarray, out: np.ndarray) -> None:
        """Rows of [start, stop) ranges, concatenated: one pread per range into out.

        With several ranges, the kernel is first told about all of them
        (POSIX_FADV_WILLNEED), so it reads them concurrently rather than one
        blocking request at a time.
        """
        view = memoryview(out.reshape(-1).view(np.uint8))
        if len(ranges) > 1:
            for start, stop in ranges:
                os.posix_fadvise(self.fd, self.offset + int(start) * self.row_bytes,
                                 int(stop - start) * self.row_bytes, os.POSIX_FADV_WILLNEED)
        at = 0
        for start, stop in ranges:
            nbytes = int(stop - start) * self.row_bytes
            where = self.offset + int(start) * self.row_bytes
            end = at + nbytes
            while at < end:  # one call returns at most ~2 GiB on Linux: read on
                got = os.preadv(self.fd, [view[at:end]], where)
                if got == 0:
                    raise OSError(f"{nbytes - (end - at)} of {nbytes} bytes read at offset "
                                  f"{where}: file truncated?")
                at += got
                where += got

    def close(self) -> None:
        os.close(self.fd)


_hdf5 = None


def actual_io_mode(dxpl) -> int | None:
    """H5Pget_mpio_actual_io_mode of the last read with dxpl (h5py does not wrap it).

    0 means HDF5 did NOT do collective I/O. None if the HDF5 library cannot be found.
    """
    global _hdf5
    if dxpl is None:
        return None
    if _hdf5 is None:
        _hdf5 = _load_hdf5() or False
    if not _hdf5:
        return None
    mode = ctypes.c_int(-1)
    if _hdf5.H5Pget_mpio_actual_io_mode(ctypes.c_int64(dxpl.id), ctypes.byref(mode)) < 0:
        return None
    return mode.value


def _load_hdf5():
    """The HDF5 library this process loaded through h5py (found in /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libhdf5" in line}
    except OSError:
        return None
    for path in sorted(paths):
        name = os.path.basename(path)
        if name.startswith("libhdf5") and "_hl" not in name:
            try:
                return ctypes.CDLL(path)
            except OSError:
                continue
    return None
