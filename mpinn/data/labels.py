"""What an import makes of a source's rows: class labels as 0..C-1, a seeded stratified
train/test split, and input statistics for standardization. All three work a block
of rows at a time, so that an import never holds a whole source in memory.

- Classes: any labels (strings, 1..C, -1/+1, 0.5/1.5) map to 0..C-1 in sorted
  order (numeric labels numerically, 2 before 10); their names are kept (the
  file's `class_names` attribute) for evaluate and predict to print.
- The split: within each class (or among all rows, for regression) exactly
  round(F * n) rows are test rows, chosen uniformly by a generator seeded by
  --seed alone. The choice depends on the class counts and the rows' order, not
  on how the rows are cut into blocks or over how many ranks.
- Moments: count, mean and sum of squared deviations per feature, merged block by
  block (Chan et al.), which stays exact where sums of squares would cancel
  (values like 1e6 +- 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mpinn.base.errors import UsageError

MAX_CLASSES = 65536  # distinct labels beyond this are a regression target, most likely


def label_text(value) -> str:
    """A label as it reads: 3.0 -> '3', b'cat' -> 'cat'."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


@dataclass(frozen=True)
class Factored:
    """A block of labels as its distinct values and, per row, the index of its value
    (a CSV's label column arrives so: hashed by the parser, never sorted as text)."""

    values: np.ndarray
    inverse: np.ndarray

    def __len__(self) -> int:
        return len(self.inverse)


def factored(labels: np.ndarray | Factored) -> Factored:
    if isinstance(labels, Factored):
        return labels
    values, inverse = np.unique(labels, return_inverse=True)
    return Factored(values, inverse.reshape(-1))


@dataclass
class Classes:
    """The distinct labels met so far and how often (collect), then their codes."""

    counts: dict = field(default_factory=dict)  # label -> rows

    def collect(self, labels: np.ndarray | Factored) -> None:
        block = factored(labels)
        counts = np.bincount(block.inverse, minlength=len(block.values))
        for value, count in zip(block.values.tolist(), counts.tolist()):
            if count:
                self.counts[value] = self.counts.get(value, 0) + count
        if len(self.counts) > MAX_CLASSES:
            raise UsageError(f"the labels have more than {MAX_CLASSES} distinct values: "
                             f"regression targets? (import them with --regression)")

    def sorted(self) -> list:
        """The labels in order: numerically where all are numbers (as numbers or as
        text: '2' before '10'), else as text."""
        values = list(self.counts)
        try:
            return sorted(values, key=lambda v: float(label_text(v)))
        except ValueError:
            return sorted(values, key=label_text)

    @property
    def names(self) -> list[str]:
        """Class k's label."""
        return [label_text(v) for v in self.sorted()]

    def class_counts(self) -> np.ndarray:
        return np.array([self.counts[v] for v in self.sorted()], np.int64)


class LabelCodes:
    """Labels -> class codes 0..C-1 by their names; an unknown label is a UsageError."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self._codes = {name: k for k, name in enumerate(self.names)}

    def encode(self, labels: np.ndarray | Factored, locate=lambda row: f"row {row + 1}"
               ) -> np.ndarray:
        """The codes of a block of labels (int32); locate(row in the block) names a row
        with an unknown label in the error."""
        block = factored(labels)
        codes = np.empty(len(block.values), np.int32)
        for k, value in enumerate(block.values.tolist()):
            code = self._codes.get(label_text(value))
            if code is None:
                rows = np.flatnonzero(block.inverse == k)
                if not len(rows):
                    continue  # a value no row of the block has
                shown = ", ".join(self.names[:10]) + (", ..." if len(self.names) > 10 else "")
                raise UsageError(f"{locate(int(rows[0]))}: label {label_text(value)!r} is not "
                                 f"one of the classes ({shown})")
            codes[k] = code
        return codes[block.inverse]


class StratifiedSplit:
    """The test rows of a stream of class codes, block by block (see the module's
    docstring). counts[c]: rows of class c in the whole source (0 classes: one group)."""

    def __init__(self, counts: np.ndarray, fraction: float, seed: int) -> None:
        rng = np.random.default_rng([seed, 0x5717])
        self.seen = np.zeros(len(counts), np.int64)  # rows of each class so far
        self.picked = []  # per class: the sorted positions, within the class, of test rows
        for n in counts.tolist():
            k = int(round(fraction * n))
            self.picked.append(np.sort(rng.choice(n, size=k, replace=False)) if k
                               else np.zeros(0, np.int64))
        self.test_rows = sum(len(p) for p in self.picked)

    def test_mask(self, codes: np.ndarray) -> np.ndarray:
        """Which rows of the next block are test rows."""
        mask = np.zeros(len(codes), bool)
        for c in np.unique(codes).tolist():
            rows = np.flatnonzero(codes == c)
            position = self.seen[c] + np.arange(len(rows))  # within class c
            picked = self.picked[c]
            self.seen[c] += len(rows)
            if not len(picked):
                continue
            at = np.searchsorted(picked, position)
            mask[rows] = (at < len(picked)) & (picked[np.minimum(at, len(picked) - 1)]
                                               == position)
        return mask


@dataclass
class Moments:
    """Per-feature count, mean and sum of squared deviations (m2) of rows seen so far."""

    count: int = 0
    mean: np.ndarray | float = 0.0
    m2: np.ndarray | float = 0.0

    def add(self, x: np.ndarray) -> None:
        """Rows x (n x D) join the moments."""
        if len(x):
            x = np.asarray(x, np.float64)
            mean = x.mean(axis=0)
            self.merge(Moments(len(x), mean, ((x - mean) ** 2).sum(axis=0)))

    def merge(self, other: Moments) -> None:
        n = self.count + other.count
        if other.count == 0:
            return
        delta = np.asarray(other.mean) - self.mean
        self.mean = self.mean + delta * (other.count / n)
        self.m2 = self.m2 + other.m2 + delta ** 2 * (self.count * other.count / n)
        self.count = n

    def standardizer(self) -> Standardizer:
        """(x - mean) / std over the rows seen (std 1 for a constant feature)."""
        std = np.sqrt(np.asarray(self.m2) / max(1, self.count))
        return Standardizer(np.asarray(self.mean, np.float64),
                            np.where(std > 0, std, 1.0))


@dataclass(frozen=True)
class Standardizer:
    mean: np.ndarray
    std: np.ndarray

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std).astype(np.float32)
