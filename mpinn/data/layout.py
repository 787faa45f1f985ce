"""The dataset file: its layout, checked without reading it all, and its values.

Layout (docs/design.md): groups `train` and `test`, each with `x` (N x D,
float32) and `y` (N integer class labels, or N x K float targets for
regression). Either group may be absent (a file to train on without test
rows, new rows to score), not both. An optional file attribute `classes` fixes
the number of classes; without it, it is max(label) + 1 over the splits.
Optional attributes written by `data import` (data/importer.py): `class_names`
(the original label of each class) and `input_mean`, `input_std` (the
standardization the stored inputs went through).

`check_data` is the collective validation every command runs before its first
collective of real work: rank 0 has the file's structure probed first (probe.py:
a corrupt file must not make HDF5 loop or crash inside the job), then every rank
checks the layout and its share of the labels. HDF5's failures to read are
UsageErrors naming the file and the object, never tracebacks. A non-finite row
that training meets (nn/finite.py checks every batch read) is named by
`nonfinite_message`. Which rows a rank reads is sampler.py's business; how it reads
them, readers.py's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import h5py
import numpy as np

from mpinn.base.errors import UsageError
from mpinn.base.hdf5 import hdf5_errors, open_hdf5
from mpinn.comm import collectives
from mpinn.comm.world import Comm
from mpinn.data import probe
from mpinn.data.labels import label_text
from mpinn.data.sampler import share

SPLITS = ("train", "test")
# |x| beyond this is no sensible network input (unscaled raw values, a sentinel like
# 1e30): `inspect --check` flags it, and a diverged run names it as the likely cause.
LARGE_INPUT = 1e6
# A `classes` attribute beyond this is a corrupt number, not a classifier to build
# (its output layer alone would take gigabytes).
MAX_CLASSES = 1 << 20


@dataclass(frozen=True)
class DatasetInfo:
    path: str
    n_train: int
    n_test: int
    features: int
    task: str  # "classification" or "regression"
    outputs: int  # classes, or regression targets; 0 while classes are still unknown
    splits: tuple[str, ...] = SPLITS  # the groups the file has

    def rows(self, split: str) -> int:
        return self.n_train if split == "train" else self.n_test

    def require(self, split: str, empty: bool = False) -> None:
        """UsageError unless the file has the group `split` and (unless empty) rows in it."""
        if split not in self.splits:
            raise UsageError(f"{self.path}: missing group '/{split}'")
        if self.rows(split) == 0 and not empty:
            raise UsageError(f"{self.path}: the {split} split is empty")


def describe(path: str) -> DatasetInfo:
    """Check the file's layout (not its values) and describe it; UsageError if wrong."""
    with open_hdf5(path) as f, hdf5_errors(path, "its layout"):
        present = tuple(s for s in SPLITS if s in f)
        if not present:
            raise UsageError(f"{path}: missing group '/train' (a dataset file has groups train "
                             f"and test, each with x and y; `mpinn data import` converts CSV, "
                             f".npy and other HDF5 files)")
        shapes = {split: split_shapes(path, f, split) for split in present}
        x, y = shapes[present[0]]
        for split in present[1:]:  # the splits agree
            if shapes[split][0][1] != x[1]:
                raise UsageError(f"{path}: {present[0]} has {x[1]} features but {split} has "
                                 f"{shapes[split][0][1]}")
            if shapes[split][1][1:] != y[1:] or len(shapes[split][1]) != len(y):
                raise UsageError(f"{path}: train and test targets differ in shape "
                                 f"({y} vs {shapes[split][1]})")
        rows = {s: shapes[s][0][0] if s in shapes else 0 for s in SPLITS}
        if sum(rows.values()) == 0:
            raise UsageError(f"{path}: the {' and '.join(present)} split"
                             f"{'s are' if len(present) > 1 else ' is'} empty")
        task = "classification" if len(y) == 1 else "regression"
        outputs = y[1] if task == "regression" else classes_attribute(path, f)
        return DatasetInfo(path, rows["train"], rows["test"], x[1], task, outputs, present)


def split_shapes(path: str, f: h5py.File, split: str) -> tuple[tuple, tuple]:
    """The shapes of a split's x and y; UsageError unless they make a split."""
    if not isinstance(f[split], h5py.Group):
        raise UsageError(f"{path}: '/{split}' is not a group (a dataset file has "
                         f"groups train and test, each with x and y)")
    for name in ("x", "y"):
        if name not in f[split] or not isinstance(f[split][name], h5py.Dataset):
            raise UsageError(f"{path}: missing dataset '/{split}/{name}'")
    x, y = f[split]["x"], f[split]["y"]
    if x.ndim != 2 or x.dtype.kind != "f" or x.shape[1] == 0:
        raise UsageError(f"{path}: /{split}/x must be a 2-D float array with at least "
                         f"one feature, got shape {x.shape} of {x.dtype}")
    if y.shape[0] != x.shape[0]:
        raise UsageError(f"{path}: /{split}/x has {x.shape[0]} rows but "
                         f"/{split}/y has {y.shape[0]}")
    labels = y.ndim == 1 and y.dtype.kind in "iu"
    if not (labels or (y.ndim == 2 and y.dtype.kind == "f" and y.shape[1] > 0)):
        raise UsageError(f"{path}: /{split}/y must hold integer labels (N,) or float "
                         f"targets (N, K), got shape {y.shape} of {y.dtype}")
    return x.shape, y.shape


def classes_attribute(path: str, f: h5py.File) -> int:
    """The file's `classes` attribute (0 if absent); UsageError if it is no plausible count."""
    value = f.attrs.get("classes", 0)
    count, plausible = 0, False
    if np.ndim(value) == 0:
        with contextlib.suppress(TypeError, ValueError, OverflowError):
            count = int(value)
            plausible = count == value and 0 <= count <= MAX_CLASSES
    if not plausible:
        raise UsageError(f"{path}: its `classes` attribute ({value!r}) is not a number of "
                         f"classes up to {MAX_CLASSES}")
    return count


def class_names(path: str) -> list[str] | None:
    """The label each class had before import (the `class_names` attribute), if any."""
    with open_hdf5(path) as f, hdf5_errors(path, "its attributes"):
        return names_text(f.attrs.get("class_names"))


def names_text(names) -> list[str] | None:
    """A stored `class_names` attribute (bytes or str) as text; None if absent."""
    return None if names is None else [label_text(n) for n in np.ravel(names)]


def label_range(path: str, split: str, start: int, stop: int) -> tuple[int, int]:
    """(min, max) of the integer labels in rows [start, stop) of a split; (0, -1) if empty."""
    if stop <= start:
        return 0, -1
    with open_hdf5(path) as f, hdf5_errors(path, f"rows {start} to {stop - 1} of /{split}/y"):
        y = f[split]["y"][start:stop]
    return int(y.min()), int(y.max())


def nonfinite_message(path: str, split: str, name: str, row: int) -> str:
    return (f"{path}: /{split}/{name} row {row} is not finite (NaN or infinity); fix or drop "
            f"that row (`mpinn data inspect --check {path}` checks every value)")


@dataclass(frozen=True)
class Problem:
    """What the data file says the model must look like (agreed by all ranks)."""

    info: DatasetInfo
    outputs: int  # classes, or regression targets

    @property
    def classification(self) -> bool:
        return self.info.task == "classification"


def check_data(comm: Comm, path: str, loss: str, features: int | None = None,
               outputs: int | None = None, split: str | None = "train",
               empty: bool = False) -> Problem:
    """Collective validation of a dataset file (and, optionally, a model's shape), which
    must have `split` (the one the command reads), with rows in it unless empty.

    Every rank checks the layout and the labels of its own share of rows, then
    all ranks agree on the outcome: UsageError on every rank if any found a fault.
    """
    collectives.root_tries(comm, lambda: probe.check(path))  # before any rank opens the file
    error, lo, hi, info = None, 0, -1, None
    try:
        info = describe(path)
        if split is not None:
            info.require(split, empty)
        if info.task == "regression" and loss == "cross-entropy":
            raise UsageError(f"{path} holds regression targets: use --loss mse")
        if info.task == "classification":
            lo, hi = _share_label_range(comm, path, info)
    except UsageError as exc:
        error = str(exc)
    reports = collectives.gather_objects(comm, (error, lo, hi))
    error = next((e for e, _, _ in reports if e is not None), None)
    if error:
        raise UsageError(error)
    assert info is not None
    n_out = info.outputs
    if info.task == "classification":
        lo = min(r[1] for r in reports if r[2] >= r[1])
        hi = max(r[2] for r in reports if r[2] >= r[1])
        n_out = n_out or hi + 1
        if lo < 0 or hi >= n_out:
            raise UsageError(f"{path}: labels must lie in [0, {n_out - 1}] "
                             f"({n_out} classes), found labels from {lo} to {hi}")
        if n_out < 2:
            raise UsageError(f"{path}: classification needs at least 2 classes, found {n_out}")
    if features is not None and features != info.features:
        raise UsageError(f"{path} has {info.features} features but the model expects {features}")
    if outputs is not None and outputs != n_out:
        kind = "classes" if info.task == "classification" else "targets"
        raise UsageError(f"{path} has {n_out} {kind} but the model has {outputs} outputs")
    return Problem(info, n_out)


def _share_label_range(comm: Comm, path: str, info: DatasetInfo) -> tuple[int, int]:
    """(min, max) label over this rank's share of both splits; (0, -1) if it has none."""
    lo, hi = 0, -1
    for split in SPLITS:
        start, stop = share(info.rows(split), comm.rank, comm.size)
        s_lo, s_hi = label_range(path, split, start, stop)
        if stop > start:
            lo, hi = (s_lo, s_hi) if hi < lo else (min(lo, s_lo), max(hi, s_hi))
    return lo, hi
