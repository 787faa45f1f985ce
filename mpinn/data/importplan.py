"""What `data import` was asked and what it makes of it: the flags (ImportSpec), what a
training file passes on to new rows (--like), where each row goes and what its target
becomes (Plan), the file's attributes and the closing line. importer.py runs it."""

from __future__ import annotations

from dataclasses import dataclass

import h5py
import numpy as np

from mpinn import __version__
from mpinn.base.errors import UsageError
from mpinn.base.hdf5 import hdf5_errors, open_hdf5
from mpinn.data import probe
from mpinn.data.labels import Classes, LabelCodes, Standardizer, StratifiedSplit
from mpinn.data.layout import describe, label_range, names_text
from mpinn.data.pwrite import SplitSpec

TEXT = (".csv", ".tsv", ".tab", ".txt")


@dataclass(frozen=True)
class ImportSpec:
    """What `data import` was asked (the command's flags)."""

    out: str
    source: str | None = None
    x: str | None = None
    y: str | None = None
    test_x: str | None = None
    test_y: str | None = None
    label: str | None = None
    columns: str | None = None
    delimiter: str | None = None
    header: bool | None = None
    regression: bool = False
    test_fraction: float = 0.0
    seed: int = 0
    standardize: bool = False
    like: str | None = None
    io: str = "independent"

    @property
    def text(self) -> bool:
        return self.source is not None and self.source.lower().endswith(TEXT)

    def check(self) -> None:
        """Refuse flags that do not go together (every rank alike, before any collective)."""
        if self.source is None and (self.x is None or self.y is None):
            raise UsageError("give --from SOURCE (CSV, TSV, .npz or HDF5), or --x X.npy and "
                             "--y Y.npy")
        if not 0 <= self.test_fraction < 1:
            raise UsageError(f"--test-fraction must be in [0, 1), got {self.test_fraction:g}")
        if self.text and (self.x or self.y or self.test_x or self.test_y):
            raise UsageError("--x, --y, --test-x, --test-y name arrays (.npy, .npz, HDF5); "
                             "a CSV's columns are chosen with --label and --columns")
        if not self.text and (self.label or self.columns or self.delimiter or self.header
                              is not None):
            raise UsageError("--label, --columns, --delimiter and --header are for CSV/TSV "
                             "sources; arrays are named with --x and --y")
        if (self.test_x is None) != (self.test_y is None):
            raise UsageError("--test-x and --test-y go together")
        if self.test_x and self.test_fraction:
            raise UsageError("the source has a test split (--test-x/--test-y): drop "
                             "--test-fraction")
        if self.like and (self.standardize or self.test_fraction or self.test_x):
            raise UsageError("--like TRAIN.h5 imports new rows as TRAIN.h5's were (its label "
                             "names and statistics) into the test split: it takes no "
                             "--standardize, --test-fraction or --test-x")


IMPORT_FLAGS = ("out", "source", "x", "y", "test_x", "test_y", "label", "columns", "delimiter",
                "header", "regression", "test_fraction", "seed", "standardize", "like")


@dataclass(frozen=True)
class Like:
    """What a training file passes on to new rows: label names, statistics, width."""

    names: list[str] | None
    scale: Standardizer | None
    features: int


def read_like(path: str) -> Like:
    """What TRAIN.h5 passes on: its class names (a file without them, as `data synth`
    writes, labels 0..C-1, which new labels then name as numbers), its statistics."""
    probe.check(path)
    info = describe(path)
    with open_hdf5(path) as f, hdf5_errors(path, "its attributes"):
        names = f.attrs.get("class_names")
        mean, std = f.attrs.get("input_mean"), f.attrs.get("input_std")
    if names is None and info.task == "classification":
        count = info.outputs or 1 + max(label_range(path, s, 0, info.rows(s))[1]
                                        for s in info.splits)
        names = [str(k) for k in range(count)]
    scale = Standardizer(np.asarray(mean, np.float64), np.asarray(std, np.float64)) \
        if mean is not None and std is not None else None
    return Like(names_text(names), scale, info.features)


def attributes(spec: ImportSpec, source: str, names: list[str] | None,
               scale: Standardizer | None, feature_names: tuple[str, ...] | None) -> dict:
    attrs: dict = {"source": source, "seed": spec.seed, "mpinn_version": __version__}
    if names is not None:
        attrs["classes"] = len(names)
        attrs["class_names"] = np.array(names, dtype=h5py.string_dtype())
    if scale is not None:
        attrs["input_mean"], attrs["input_std"] = scale.mean, scale.std
    if feature_names is not None:
        attrs["feature_names"] = np.array(feature_names, dtype=h5py.string_dtype())
    return attrs


@dataclass
class Plan:
    """Where the rows go (the split) and what their targets become (codes, floats)."""

    spec: ImportSpec
    codes: LabelCodes | None
    split: StratifiedSplit | None
    train: int
    test: int
    all_test: bool

    @staticmethod
    def make(spec: ImportSpec, like: Like | None, classes: Classes, rows: int,
             test_rows: int = 0) -> Plan:
        names = (like.names if like and like.names else classes.names) \
            if not spec.regression else None
        if names is not None and len(names) < 2 and not like:
            raise UsageError(f"{spec.source or spec.y}: the labels hold one class "
                             f"({names[0] if names else 'none'}); classification needs two "
                             f"(or import with --regression)")
        counts = classes.class_counts() if names is not None else np.array([rows])
        split = StratifiedSplit(counts, spec.test_fraction, spec.seed) \
            if spec.test_fraction else None
        n_test = rows if like else (split.test_rows if split else test_rows)
        codes = LabelCodes(names) if names is not None else None
        return Plan(spec, codes, split, rows - n_test if not test_rows else rows,
                    n_test, like is not None)

    @property
    def names(self) -> list[str] | None:
        return self.codes.names if self.codes else None

    def specs(self, features: int) -> dict[str, SplitSpec]:
        y_shape, y_dtype = ((1,), "float32") if self.codes is None else ((), "int32")
        return {split: SplitSpec(n, features, y_shape, y_dtype)
                for split, n in (("train", self.train), ("test", self.test))
                if n or (split == "train" and not self.all_test)}

    def targets(self, y: np.ndarray, locate) -> np.ndarray:
        """Labels -> int32 codes, or targets -> float32 (N x K)."""
        if self.codes is None:
            return np.asarray(y, np.float32).reshape(len(y), -1)
        return self.codes.encode(y, locate)

    def test_mask(self, y: np.ndarray) -> np.ndarray:
        if self.all_test:
            return np.ones(len(y), bool)
        if self.split is None:
            return np.zeros(len(y), bool)
        return self.split.test_mask(y if self.codes is not None else np.zeros(len(y), int))


def summary_line(spec: ImportSpec, plan: Plan, scale: Standardizer | None) -> str:
    what = (f"{len(plan.names)} classes ({', '.join(plan.names[:10])}"
            f"{', ...' if len(plan.names) > 10 else ''})" if plan.names else "regression targets")
    inputs = ("standardized with the training rows' mean and standard deviation"
              if spec.standardize else f"standardized as in {spec.like}" if scale is not None
              else "stored as they are (not standardized: see --standardize)")
    return (f"imported {plan.train:,} train and {plan.test:,} test rows, {what}; inputs "
            f"{inputs}")


