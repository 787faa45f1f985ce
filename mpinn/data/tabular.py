"""Delimited text (CSV, TSV) as blocks of rows, for `mpinn data import`.

The file is read in blocks of about BLOCK_BYTES cut at line ends, so memory does
not grow with the file and every block knows its first line's number. pandas' C
parser turns a block into columns (the optional extra `csv`: 3 to 5 times
numpy.loadtxt's speed here, and it reads quoted fields); a field may be quoted
but may not hold a line break. Any block the parser refuses, or whose values are
not all finite numbers where numbers are due, is scanned again line by line
(the csv module) to name the first bad line and column: ragged rows, empty or
non-numeric cells, NaN or infinity. That slow path runs only on bad input.

The header is detected (a first line with a non-number where the second line
has a number), unless --header/--no-header says; the delimiter comes from the
extension (.tsv, .tab: tab), the first line, or --delimiter.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from mpinn.base.errors import UsageError
from mpinn.data.labels import Factored

BLOCK_BYTES = 16 << 20


@dataclass(frozen=True)
class Table:
    path: str
    delimiter: str
    header: bool
    names: tuple[str, ...]  # every column's name: the header's, else its index
    features: tuple[int, ...]  # the input columns
    label: int  # the label (or target) column
    size: int  # bytes

    def where(self, line: int, column: int | None = None) -> str:
        """'data.csv line 17, column "x3"'"""
        text = f"{self.path} line {line}"
        return text + (f", column {self.names[column]!r}" if column is not None else "")


@dataclass(frozen=True)
class Block:
    table: Table
    offset: int  # of the block's first byte in the file
    end: int  # the byte offset after the block (progress)
    x: np.ndarray | None  # rows x features, float64 (None when only labels were read)
    y: np.ndarray | Factored  # targets (float64), or the labels as Factored

    def where(self, row: int) -> str:
        """Row `row` of the block, as 'data.csv line 17'."""
        return self.table.where(line_at(self.table.path, self.offset) + row)


def pandas():
    try:
        import pandas
    except ImportError:
        raise UsageError("importing CSV needs pandas: pip install 'mpinn[csv]' (or pip "
                         "install pandas)") from None
    return pandas


def open_table(path: str, delimiter: str | None = None, header: bool | None = None,
               label: str | None = None, columns: str | None = None) -> Table:
    """The table's dialect, header and columns; UsageError naming what does not fit."""
    if not os.path.isfile(path):
        raise UsageError(f"--from {path}: no such file")
    first, second = _first_lines(path)
    if delimiter is None:
        tab = path.lower().endswith((".tsv", ".tab")) or ("\t" in first and "," not in first)
        delimiter = "\t" if tab else ","
    head = _fields(first, delimiter)
    if header is None:
        rest = _fields(second, delimiter) if second else []
        header = any(not _number(a) and _number(b) for a, b in zip(head, rest)) \
            or (not rest and not any(map(_number, head)))
    names = tuple(head) if header else tuple(str(k) for k in range(len(head)))
    if len(set(names)) < len(names):
        raise UsageError(f"{path}: the header names a column twice")
    target = _column(path, names, label if label is not None else str(len(names) - 1),
                     "--label")
    chosen = ([_column(path, names, c.strip(), "--columns") for c in columns.split(",")
               if c.strip()] if columns else [k for k in range(len(names)) if k != target])
    if target in chosen:
        raise UsageError(f"--columns includes the label column {names[target]!r}")
    if not chosen:
        raise UsageError(f"{path}: no input columns besides the label {names[target]!r}")
    return Table(path, delimiter, header, names, tuple(chosen), target, os.path.getsize(path))


def _first_lines(path: str) -> tuple[str, str]:
    try:
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
            lines = [line for line in (f.readline(), f.readline())]
    except OSError as exc:
        raise UsageError(f"--from {path}: cannot read ({exc.strerror})") from None
    if not lines[0].strip():
        raise UsageError(f"{path}: the file is empty (or its first line is)")
    return lines[0].rstrip("\r\n"), lines[1].rstrip("\r\n")


def _fields(line: str, delimiter: str) -> list[str]:
    return next(csv.reader([line], delimiter=delimiter), [])


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _column(path: str, names: tuple[str, ...], key: str, flag: str) -> int:
    """A column by name, else by index (negative from the end)."""
    if key in names:
        return names.index(key)
    try:
        k = int(key)
    except ValueError:
        k = None
    if k is None or not -len(names) <= k < len(names):
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise UsageError(f"{flag} {key}: {path} has no such column (columns: {shown}; or "
                         f"an index from 0 to {len(names) - 1})")
    return k % len(names)


def chunks(table: Table) -> Iterator[tuple[int, bytes]]:
    """(byte offset, text) of each block of whole lines, the header excluded. Line numbers
    are not counted here: only a bad block needs them (line_at)."""
    with open(table.path, "rb") as f:
        offset = 0
        if table.header:
            offset = len(f.readline())
        while True:
            text = f.read(BLOCK_BYTES)
            if not text:
                return
            if not text.endswith(b"\n"):
                text += f.readline()  # the rest of the last line
            yield offset, text
            offset += len(text)


def line_at(path: str, offset: int) -> int:
    """The number of the line that starts at byte `offset` (1-based; the slow path)."""
    lines = 1
    with open(path, "rb") as f:
        while offset > 0:
            data = f.read(min(offset, BLOCK_BYTES))
            if not data:
                break
            lines += data.count(b"\n")
            offset -= len(data)
    return lines


def blocks(table: Table, regression: bool, labels_only: bool = False) -> Iterator[Block]:
    """The table's rows, a block at a time, every value checked (see the module). The
    next block is parsed in a thread while the caller handles this one (the parser
    lets go of the GIL; NumPy and HDF5 work then overlap it)."""
    with ThreadPoolExecutor(1, thread_name_prefix="mpinn-csv") as pool:
        pending = None
        for offset, text in chunks(table):
            ahead = pool.submit(parse, table, offset, text, regression, labels_only)
            block = pending.result() if pending is not None else None
            if block is not None:
                yield block
            pending = ahead
        block = pending.result() if pending is not None else None
        if block is not None:
            yield block


def parse(table: Table, offset: int, text: bytes, regression: bool,
          labels_only: bool) -> Block | None:
    """A block of lines parsed and checked; None if it holds blank lines only."""
    pd = pandas()
    kind = "float64" if regression else "category"  # labels: hashed, not sorted
    if labels_only:
        dtypes, use = {table.label: kind}, [table.label]
    else:
        dtypes = {k: str for k in range(len(table.names))}
        dtypes.update({k: "float64" for k in table.features} | {table.label: kind})
        use = None
    if offset == 0 and text.startswith(b"\xef\xbb\xbf"):
        text = text[3:]  # a byte-order mark
    try:
        frame = pd.read_csv(io.BytesIO(text), sep=table.delimiter, header=None,
                            usecols=use, dtype=dtypes, na_filter=False, engine="c")
    except pd.errors.EmptyDataError:
        return None
    except (ValueError, pd.errors.ParserError) as exc:
        raise UsageError(explain(table, offset, text, regression, labels_only)
                         or f"{table.path}: from byte {offset}: {exc}") from None
    return _checked(table, offset, text, frame, regression, labels_only)


def _checked(table: Table, offset: int, text: bytes, frame, regression: bool,
             labels_only: bool) -> Block:
    column = frame[table.label]
    if regression:
        y = column.to_numpy(np.float64)
    else:
        y = Factored(column.cat.categories.to_numpy(object), column.cat.codes.to_numpy())
    x = None if labels_only else frame[list(table.features)].to_numpy(np.float64)
    bad = (frame.shape[1] != (1 if labels_only else len(table.names))
           or (regression and not np.isfinite(y).all())
           or (not regression and ("" in set(y.values) or (y.inverse < 0).any()))
           or (x is not None and not np.isfinite(x).all()))
    if bad:
        raise UsageError(explain(table, offset, text, regression, labels_only)
                         or f"{table.path}: a bad value in the lines from byte {offset}")
    return Block(table, offset, offset + len(text), x, y)


def explain(table: Table, offset: int, text: bytes, regression: bool,
            labels_only: bool) -> str | None:
    """The first bad line of a block and why (the slow path: the csv module)."""
    first_line = line_at(table.path, offset)
    width = len(table.names)
    numbers = [] if labels_only else list(table.features)
    if regression:
        numbers.append(table.label)
    lines = text.decode("utf-8", errors="replace").split("\n")
    for k, raw in enumerate(lines):
        if not raw.strip():
            continue
        fields = _fields(raw.rstrip("\r"), table.delimiter)
        where = first_line + k
        if len(fields) != width:
            return (f"{table.where(where)}: {len(fields)} fields where the "
                    f"{'header' if table.header else 'first line'} has {width} (a ragged row)")
        for column in numbers:
            problem = _bad_number(fields[column])
            if problem:
                return f"{table.where(where, column)}: {problem}"
        if not regression and not fields[table.label].strip():
            return f"{table.where(where, table.label)}: an empty label"
    return None


def _bad_number(text: str) -> str | None:
    if not text.strip():
        return "an empty cell (a missing value: fill or drop the row)"
    try:
        value = float(text)
    except ValueError:
        return f"{text!r} is not a number"
    return None if math.isfinite(value) else f"{text!r} is not finite (NaN or infinity)"
