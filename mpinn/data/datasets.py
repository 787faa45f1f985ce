"""Writers of dataset files (the layout: layout.py): synthetic teacher data and digits.

Synthetic data is generated in fixed blocks of BLOCK rows, each block from its
own generator seeded by (seed, split, block), so the file's content is a pure
function of the arguments, whoever writes which blocks. Every writer produces
the file atomically: an interrupted write leaves no half-written dataset.
"""

from __future__ import annotations

import gzip
import os

import h5py
import numpy as np

from mpinn import __version__
from mpinn.base.errors import UsageError
from mpinn.base.files import check_writable
from mpinn.base.hdf5 import hdf5_errors, open_hdf5
from mpinn.data import probe
from mpinn.data.layout import LARGE_INPUT, SPLITS, DatasetInfo, describe, nonfinite_message
from mpinn.data.pwrite import SplitSpec, write_parallel, write_serial
from mpinn.nn.finite import nonfinite_row

BLOCK = 8192  # rows per generator stream in synthetic data
MAX_SHOWN_CLASSES = 1000  # `inspect` counts labels up to this without a `classes` attribute


class Teacher:
    """A fixed random tanh network that labels Gaussian inputs: a learnable task."""

    def __init__(self, seed: int, features: int, outputs: int, hidden: int = 64) -> None:
        rng = np.random.default_rng([seed, 0x7EAC])
        self.w1 = rng.standard_normal((features, hidden)) * np.sqrt(1.0 / features)
        self.b1 = rng.standard_normal(hidden) * 0.1
        self.w2 = rng.standard_normal((hidden, outputs)) * np.sqrt(1.0 / hidden)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.tanh(x @ self.w1 + self.b1) @ self.w2


def synth_block(teacher: Teacher, seed: int, split: str, block: int, rows: int,
                features: int, regression: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rows of block `block` of a split: Gaussian x and the teacher's labels (or targets)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), block])
    x = rng.standard_normal((rows, features)).astype(np.float32)
    out = teacher(x.astype(np.float64))
    y = out.astype(np.float32) if regression else out.argmax(axis=1).astype(np.int32)
    return x, y


def write_synth(path: str, samples: int, features: int = 32, classes: int = 10,
                test_samples: int | None = None, seed: int = 0, regression: bool = False,
                comm=None, io: str = "independent") -> None:
    """Synthetic teacher data: `classes` labels, or `classes` float targets if regression.

    With a communicator (the command's, of any size), every rank generates and writes
    its share of the blocks and the ranks agree on every failure (pwrite.py); without
    one, this process writes it alone. The file is the same whoever writes it.
    """
    if test_samples is None:
        test_samples = max(1, samples // 5)
    for name, value, low in (("--samples", samples, 1), ("--features", features, 1),
                             ("--classes", classes, 1 if regression else 2),
                             ("--test-samples", test_samples, 0)):
        if value < low:
            raise UsageError(f"{name} must be >= {low}, got {value}")
    teacher = Teacher(seed, features, classes)
    y_shape, y_dtype = ((classes,), "float32") if regression else ((), "int32")
    specs = {split: SplitSpec(n, features, y_shape, y_dtype)
             for split, n in (("train", samples), ("test", test_samples))}
    attrs = _attributes("synthetic teacher network", seed, None if regression else classes)

    def produce(split: str, block: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
        return synth_block(teacher, seed, split, block, rows, features, regression)

    if comm is not None:  # the command: its ranks agree on every failure (exit 1)
        write_parallel(comm, path, io, specs, attrs, produce, BLOCK)
    else:
        write_serial(path, specs, attrs, produce, BLOCK)


def write_digits(path: str, test_fraction: float = 0.2, seed: int = 0) -> None:
    """scikit-learn's bundled 8x8 digits (1797 samples, 10 classes), pixels scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UsageError("`mpinn data digits` needs scikit-learn: pip install 'mpinn[digits]' "
                         "(or pip install scikit-learn)") from None
    check_writable(path)
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    parts = {"test": order[:n_test], "train": order[n_test:]}
    _write_arrays(path, {split: (x[np.sort(rows)], y[np.sort(rows)])
                         for split, rows in parts.items()},
                  _attributes("scikit-learn load_digits (UCI optical digits, 8x8)", seed, 10))


IDX_NAMES = {"train": ("train-images", "train-labels"), "test": ("t10k-images", "t10k-labels")}
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _find_idx(directory: str, stem: str) -> str:
    """The idx file `stem*-idx?-ubyte[.gz]` (or `stem.idx?-ubyte`) in directory."""
    matches = sorted(n for n in os.listdir(directory)
                     if n.startswith(stem) and "idx" in n and "ubyte" in n)
    if not matches:
        raise UsageError(f"{directory}: no {stem}-idx*-ubyte[.gz] file (expected the four "
                         f"MNIST-format files train-images, train-labels, t10k-images, "
                         f"t10k-labels)")
    return os.path.join(directory, matches[0])


def read_idx(path: str) -> np.ndarray:
    """An array from an idx file (the MNIST format), gzipped or not.

    Header: two zero bytes, a type code, the number of dimensions, then each
    dimension as a big-endian uint32; the values follow, big-endian.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise UsageError(f"{path}: cannot read ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES:
        raise UsageError(f"{path}: not an idx file (bad magic number)")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    dtype = np.dtype(IDX_TYPES[raw[2]])
    expected = 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise UsageError(f"{path}: truncated or oversized idx file ({len(raw)} bytes, "
                         f"header says {expected})")
    return np.frombuffer(raw, dtype, offset=4 + 4 * ndim).reshape(dims)


def write_idx(path: str, directory: str) -> None:
    """MNIST-format idx files (MNIST, Fashion-MNIST) -> dataset; pixels scaled to [0, 1]."""
    if not os.path.isdir(directory):
        raise UsageError(f"--from {directory}: no such directory")
    check_writable(path)
    splits = {}
    for split, (images, labels) in IDX_NAMES.items():
        x = read_idx(_find_idx(directory, images))
        y = read_idx(_find_idx(directory, labels))
        if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
            raise UsageError(f"{directory}: {split} images {x.shape} and labels {y.shape} "
                             f"do not match")
        scale = 255.0 if x.dtype == np.uint8 else 1.0
        splits[split] = ((x.reshape(len(x), -1) / scale).astype(np.float32), y.astype(np.int32))
    classes = int(max(y.max() for _, y in splits.values())) + 1
    source = f"idx files ({os.path.basename(os.path.normpath(directory))})"
    _write_arrays(path, splits, _attributes(source, 0, classes))


def _attributes(source: str, seed: int, classes: int | None) -> dict:
    attrs = {"source": source, "seed": seed, "mpinn_version": __version__}
    if classes is not None:
        attrs["classes"] = classes
    return attrs


def _write_arrays(path: str, splits: dict[str, tuple[np.ndarray, np.ndarray]],
                  attrs: dict) -> None:
    """A dataset file from in-memory (x, y) per split, atomically."""
    specs = {s: SplitSpec(len(x), x.shape[1], y.shape[1:], str(y.dtype))
             for s, (x, y) in splits.items()}
    rows = max(len(x) for x, _ in splits.values())
    write_serial(path, specs, attrs, lambda split, _, n: splits[split], max(rows, 1))


def inspect(path: str) -> str:
    """A human-readable description: layout, sizes, chunking, class balance.
    The file's structure is probed first (probe.py): a corrupt file is a message."""
    probe.check(path)
    info = describe(path)
    lines = [f"{path}: {os.path.getsize(path) / 2**20:.1f} MiB, {info.task}, "
             f"{info.features} features"]
    with open_hdf5(path) as f, hdf5_errors(path, "its datasets"):
        for key, value in f.attrs.items():
            lines.append(f"  attribute {key} = {shown(value)}")
        for split in info.splits:
            for name in ("x", "y"):
                d = f[split][name]
                lines.append(f"  /{split}/{name}: shape {d.shape}, {d.dtype}, chunks {d.chunks}, "
                             f"compression {d.compression}")
            if info.task == "classification":
                lines.append(f"  /{split} class counts: {class_counts(f[split]['y'], info)}")
    return "\n".join(lines)


def shown(value) -> str:
    """An attribute's value, a long array by its first few elements."""
    if isinstance(value, np.ndarray) and value.size > 8:
        head = ", ".join(str(v.decode() if isinstance(v, bytes) else v)
                         for v in value.ravel()[:4])
        return f"[{head}, ...] ({value.size} values)"
    if isinstance(value, np.ndarray) and value.dtype.kind in "OS":
        return "[" + ", ".join(str(v.decode() if isinstance(v, bytes) else v)
                               for v in value.ravel()) + "]"
    return str(value)


def class_counts(y: h5py.Dataset, info: DatasetInfo) -> str:
    """'0: n0, 1: n1, ...' for the labels of a split, read a block at a time; labels
    outside [0, classes) (or beyond MAX_SHOWN_CLASSES without a `classes` attribute)
    are counted together, not given a line each (a corrupt label may be 2**25)."""
    limit = info.outputs or MAX_SHOWN_CLASSES
    counts, outside = np.zeros(0, np.int64), 0
    for start in range(0, len(y), 1 << 20):
        labels = y[start:start + (1 << 20)].astype(np.int64)
        valid = (labels >= 0) & (labels < limit)
        outside += int(len(labels) - np.count_nonzero(valid))
        c = np.bincount(labels[valid])
        counts = np.pad(counts, (0, max(0, len(c) - len(counts))))
        counts[: len(c)] += c
    text = ", ".join(f"{k}: {v}" for k, v in enumerate(counts))
    return text + (f"; {outside} labels outside [0, {limit - 1}]" if outside else "")


def check_values(path: str, block_rows: int = 1 << 16, max_abs: float = LARGE_INPUT) -> str:
    """Read every value: inputs finite and within max_abs, labels in [0, classes),
    targets finite. UsageError naming the first bad row (or the rows HDF5 cannot read);
    otherwise a one-line report.
    """
    probe.check(path)
    info = describe(path)
    classes = info.outputs if info.task == "classification" else 0
    with open_hdf5(path) as f:
        for split in info.splits:
            x, y = f[split]["x"], f[split]["y"]
            for start in range(0, len(x), block_rows):
                stop = min(start + block_rows, len(x))
                with hdf5_errors(path, f"rows {start} to {stop - 1} of /{split}"):
                    xb, yb = x[start:stop], y[start:stop]
                check_block(path, split, start, xb, yb, classes, max_abs)
    return f"{path}: every value checked: {info.n_train + info.n_test} rows, all valid"


def check_block(path: str, split: str, start: int, xb: np.ndarray, yb: np.ndarray,
                classes: int, max_abs: float) -> None:
    """UsageError naming the first bad row of a block of rows starting at row `start`."""
    for name, values in (("x", xb), ("y", yb if yb.dtype.kind == "f" else yb[:0])):
        row = nonfinite_row(values)
        if row is not None:
            raise UsageError(nonfinite_message(path, split, name, start + row))
    large = np.flatnonzero((np.abs(xb) > max_abs).any(axis=1))
    if len(large):
        row = int(large[0])
        raise UsageError(f"{path}: /{split}/x row {start + row} holds |x| = "
                         f"{np.abs(xb[row]).max():.3g}, beyond {max_abs:g}: no sensible network "
                         f"input (scale the features, e.g. to zero mean and unit variance)")
    if yb.dtype.kind in "iu":
        bad = np.flatnonzero((yb < 0) | (yb >= classes if classes else False))
        what = f"label outside [0, {classes - 1}]" if classes else "a negative label"
        if len(bad):
            raise UsageError(f"{path}: /{split}/y row {start + bad[0]} has {what} "
                             f"({yb[bad[0]]})")
