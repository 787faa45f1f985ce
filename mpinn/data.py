"""Datasets on disk: the HDF5 layout, the epoch sampler, and the per-rank reader.

Layout (DESIGN.md section 3): groups `train` and `test`, each with `x`
(N x D, float32) and `y` (N integer class labels, or N x K float targets for
regression). An optional file attribute `classes` fixes the number of classes;
without it, it is max(label) + 1 over both splits.

Sampling: the order of an epoch is a pure function of (seed, epoch), never of
the number of ranks. Global batch k is order[k*B : (k+1)*B] (the last one may be
short); rank r of P takes a contiguous share of it (shares differ by at most one
sample, and may be empty). Every sample is used exactly once per epoch.

Each rank opens the file read-only and reads only the rows of its own shares.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import h5py
import numpy as np

from .errors import UsageError

SPLITS = ("train", "test")
# HDF5's chunk cache per open dataset (default 1 MiB): a shuffled epoch revisits
# every chunk, so a larger cache saves re-reading chunks for neighbouring rows.
CHUNK_CACHE_BYTES = 32 << 20
CHUNK_CACHE_SLOTS = 100_003  # a prime, well above the number of cached chunks


@dataclass(frozen=True)
class DatasetInfo:
    path: str
    n_train: int
    n_test: int
    features: int
    task: str  # "classification" or "regression"
    outputs: int  # classes, or regression targets; 0 while classes are still unknown

    def rows(self, split: str) -> int:
        return self.n_train if split == "train" else self.n_test


def describe(path: str) -> DatasetInfo:
    """Check the file's layout (not its values) and describe it; UsageError if wrong."""
    try:
        f = h5py.File(path, "r")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except OSError as exc:
        raise UsageError(f"{path}: not a readable HDF5 file ({exc})") from None
    with f:
        shapes = {}
        for split in SPLITS:
            if split not in f or not isinstance(f[split], h5py.Group):
                raise UsageError(f"{path}: missing group '/{split}' (a dataset file has "
                                 f"groups train and test, each with x and y)")
            for name in ("x", "y"):
                if name not in f[split] or not isinstance(f[split][name], h5py.Dataset):
                    raise UsageError(f"{path}: missing dataset '/{split}/{name}'")
            x, y = f[split]["x"], f[split]["y"]
            if x.ndim != 2 or x.dtype.kind != "f":
                raise UsageError(f"{path}: /{split}/x must be a 2-D float array, "
                                 f"got shape {x.shape} of {x.dtype}")
            if y.shape[0] != x.shape[0]:
                raise UsageError(f"{path}: /{split}/x has {x.shape[0]} rows but "
                                 f"/{split}/y has {y.shape[0]}")
            labels = y.ndim == 1 and y.dtype.kind in "iu"
            if not (labels or (y.ndim == 2 and y.dtype.kind == "f")):
                raise UsageError(f"{path}: /{split}/y must hold integer labels (N,) or float "
                                 f"targets (N, K), got shape {y.shape} of {y.dtype}")
            shapes[split] = (x.shape, y.shape)
        (xtr, ytr), (xte, yte) = shapes["train"], shapes["test"]
        if xtr[1] != xte[1]:
            raise UsageError(f"{path}: train has {xtr[1]} features but test has {xte[1]}")
        if len(ytr) != len(yte) or ytr[1:] != yte[1:]:
            raise UsageError(f"{path}: train and test targets differ in shape ({ytr} vs {yte})")
        if xtr[0] == 0:
            raise UsageError(f"{path}: the train split is empty")
        task = "classification" if len(ytr) == 1 else "regression"
        outputs = ytr[1] if task == "regression" else int(f.attrs.get("classes", 0))
        return DatasetInfo(path, xtr[0], xte[0], xtr[1], task, outputs)


def label_range(path: str, split: str, start: int, stop: int) -> tuple[int, int]:
    """(min, max) of the integer labels in rows [start, stop) of a split; (0, -1) if empty."""
    if stop <= start:
        return 0, -1
    with h5py.File(path, "r") as f:
        y = f[split]["y"][start:stop]
    return int(y.min()), int(y.max())


def share(n: int, rank: int, size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of n items; sizes differ by at most one."""
    q, r = divmod(n, size)
    start = rank * q + min(rank, r)
    return start, start + q + (rank < r)


def epoch_order(seed: int, epoch: int, n: int, shuffle: bool) -> np.ndarray:
    """The sample order of an epoch: a function of (seed, epoch) only."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch, 0x5A3D]).permutation(n)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def local_batches(order: np.ndarray, batch_size: int, rank: int, size: int
                  ) -> Iterator[tuple[np.ndarray, int]]:
    """For each global batch: (this rank's sample indices, the global batch size)."""
    for begin in range(0, len(order), batch_size):
        batch = order[begin:begin + batch_size]
        lo, hi = share(len(batch), rank, size)
        yield batch[lo:hi], len(batch)


class SplitReader:
    """Reads chosen rows of one split into preallocated buffers (serial driver)."""

    def __init__(self, path: str, split: str, max_rows: int) -> None:
        self._file = h5py.File(path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES,
                               rdcc_nslots=CHUNK_CACHE_SLOTS)
        self.x = self._file[split]["x"]
        self.y = self._file[split]["y"]
        self.n = self.x.shape[0]
        self._xbuf = np.empty((max_rows,) + self.x.shape[1:], self.x.dtype)
        self._ybuf = np.empty((max_rows,) + self.y.shape[1:], self.y.dtype)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows `indices` (in that order) as views of the reader's buffers.

        A contiguous ascending run is one slice read. Scattered rows are read in
        one HDF5 call with a sorted point selection, then put back in the
        requested order (summation order, hence results, follow the sampler).
        """
        n = len(indices)
        x, y = self._xbuf[:n], self._ybuf[:n]
        if n == 0:
            return x, y
        first = int(indices[0])
        if int(indices[-1]) - first == n - 1 and np.all(np.diff(indices) == 1):
            self.x.read_direct(x, np.s_[first:first + n])
            self.y.read_direct(y, np.s_[first:first + n])
            return x, y
        order = np.argsort(indices, kind="stable")
        rows = indices[order]
        x[order] = self.x[rows]
        y[order] = self.y[rows]
        return x, y

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SplitReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
