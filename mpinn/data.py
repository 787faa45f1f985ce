"""The dataset file layout: what a valid file looks like, checked without reading it all.

Layout (DESIGN.md section 3): groups `train` and `test`, each with `x`
(N x D, float32) and `y` (N integer class labels, or N x K float targets for
regression). An optional file attribute `classes` fixes the number of classes;
without it, it is max(label) + 1 over both splits.

Which rows a rank reads is sampler.py's business; how it reads them, readers.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

import h5py

from .errors import UsageError

SPLITS = ("train", "test")


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
