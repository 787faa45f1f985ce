"""Arrays an import reads rows of: .npy files (memory-mapped), members of an .npz
archive (read from the archive a span of rows at a time, never whole) and datasets
of any HDF5 file. Each is a RowArray: a shape, a dtype and rows(lo, hi)."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator

import h5py
import numpy as np

from mpinn.base.errors import UsageError
from mpinn.base.hdf5 import hdf5_errors, open_hdf5

SPAN_BYTES = 16 << 20  # the most one read of a span of rows takes


class RowArray:
    """Rows of an array (N x ...) by span; named in errors by `name`."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype: np.dtype, read,
                 close=lambda: None) -> None:
        self.name, self.shape, self.dtype, self._read = name, tuple(shape), np.dtype(dtype), read
        self.close = close
        if len(self.shape) == 0 or self.dtype.kind not in "biufSU":
            raise UsageError(f"{name}: an array of rows of numbers or labels is needed, got "
                             f"shape {self.shape} of {self.dtype}")

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def row_bytes(self) -> int:
        return max(1, int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize)

    def rows(self, lo: int, hi: int) -> np.ndarray:
        return np.asarray(self._read(lo, hi))

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The ascending rows `rows`, read a span at a time."""
        parts, step = [], max(1, SPAN_BYTES // self.row_bytes)
        k = 0
        while k < len(rows):
            lo = int(rows[k])
            end = int(np.searchsorted(rows, lo + step, "left"))  # rows within [lo, lo+step)
            span = self.rows(lo, int(rows[end - 1]) + 1)
            parts.append(span[rows[k:end] - lo])
            k = end
        return np.concatenate(parts) if parts else self.rows(0, 0)

    def spans(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows) over the whole array, a span at a time."""
        step = max(1, SPAN_BYTES // self.row_bytes)
        for lo in range(0, len(self), step):
            yield lo, self.rows(lo, min(len(self), lo + step))


def npy(path: str) -> RowArray:
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UsageError(f"{path}: not a readable .npy file ({exc})") from None
    if not isinstance(array, np.ndarray):
        raise UsageError(f"{path}: an .npz archive: give it with --from and name its arrays "
                         f"with --x and --y")
    return RowArray(path, array.shape, array.dtype, lambda lo, hi: array[lo:hi])


def npz(path: str, key: str) -> RowArray:
    """Member `key` of an .npz archive, read a span at a time (stored or deflated)."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise UsageError(f"--from {path}: not a readable .npz archive ({exc})") from None
    names = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
    if key not in names:
        raise UsageError(f"{path} has no array {key!r} (it has {', '.join(names)})")
    with archive.open(key + ".npy") as member:
        try:
            version = np.lib.format.read_magic(member)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(member)
        except ValueError as exc:
            raise UsageError(f"{path}: array {key!r} is not a readable .npy ({exc})") from None
        start = member.tell()
    if fortran and len(shape) > 1:
        raise UsageError(f"{path}: array {key!r} is in Fortran order: save it in C order "
                         f"(np.ascontiguousarray) to import it a span of rows at a time")
    row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    opened: list = []  # the member, kept open: reads go forward (a deflated member
    #                    seeks backwards only by decompressing again from its start)

    def read(lo: int, hi: int) -> np.ndarray:
        at = start + lo * row
        if not opened or opened[0].tell() > at:
            close()
            opened.append(archive.open(key + ".npy"))
        opened[0].seek(at)
        data = opened[0].read((hi - lo) * row)
        return np.frombuffer(data, dtype).reshape((hi - lo, *shape[1:]))

    def close() -> None:
        while opened:
            opened.pop().close()
    return RowArray(f"{path}:{key}", shape, dtype, read, close)


def hdf5(path: str, name: str) -> RowArray:
    """Dataset `name` of an HDF5 file (kept open while the import runs)."""
    f = open_hdf5(path)  # (probed first: the caller's business)
    with hdf5_errors(path, name):
        found = f.get(name)
        if not isinstance(found, h5py.Dataset):
            listed = []
            f.visititems(lambda n, o: listed.append("/" + n)
                         if isinstance(o, h5py.Dataset) else None)
            raise UsageError(f"{path} has no dataset {name!r} (it has "
                             f"{', '.join(listed[:20]) or 'none'})")

    def read(lo: int, hi: int) -> np.ndarray:
        with hdf5_errors(path, f"rows {lo} to {hi - 1} of {name}"):
            return found[lo:hi]
    return RowArray(f"{path}:{name}", found.shape, found.dtype, read, f.close)
