"""Which rows each rank trains on at each step of an epoch.

Three shuffle modes, all using every sample exactly once per epoch:

- `global` (default): the epoch's order is a permutation that depends on
  (seed, epoch) only. Global batch k is order[k*B : (k+1)*B] (the last may be
  short); rank r of P takes a contiguous share of it (shares differ by at most
  one sample, and may be empty). P-invariant: results do not depend on P.
- `none`: the same with order = file order, so batch k is rows k*B .. k*B+B-1.
  P-invariant.
- `feistel`: as `global`, with the permutation computed instead of stored: a keyed
  Feistel network (feistel.py) maps a position to its row, and the plan computes a
  step's rows when asked (Lazy), so memory does not grow with n. P-invariant. Its
  hold-out is the first round(F * n) positions of another keyed permutation, and the
  training rows the rest of it, in that permutation's order (no list of n rows).
- `block`: for files far larger than memory and for fast sequential reads. The
  file is cut into blocks of `block_rows` consecutive rows and the blocks are
  permuted (by seed, epoch). Steps are grouped into windows of about
  `window_rows / B` steps; the rows a window consumes are the next stretch of
  the permuted blocks, cut into P contiguous pieces, one per rank, sized to that
  rank's shares of the window's steps. Each rank reads its piece with a few
  large contiguous reads, shuffles it in memory, and deals it out over the
  window's steps. Batches mix rows from P regions of the file. NOT P-invariant:
  which rows meet in a batch depends on P (and on seed and epoch).

With gradient accumulation (K micro-batches per update), micro-batch k of a
global batch of B rows is its contiguous part share(B, k, K), and rank r takes
its share of every micro-batch: its rows of a step are those K shares one after
another (`micro` holds their lengths). The sum over micro-batches and ranks is
the sum over the batch whatever K and P are. (Block mode splits each rank's rows
of a step into K parts: it is not P-invariant anyway.)

Validation (--val-fraction F) holds out `holdout(seed, n, F)` of the n training
rows: the first round(F * n) entries of a permutation drawn from a generator
keyed by (seed, VAL_STREAM), sorted. It depends on nothing else (not on P, not
on the epoch), so it is the same set for every P and every resume. The epochs
then run over the remaining rows only (`rows=` of epoch_plan): the global and
none orders above, applied to positions in that list, so still P-invariant.
Block shuffle reads contiguous blocks of the file and would read held-out rows
with them: the combination is refused (run/config.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mpinn.data.feistel import Feistel

SHUFFLES = ("global", "block", "none", "feistel")
VAL_STREAM = 0x7A11  # generator stream of the held-out rows: (seed, VAL_STREAM) -> rows


@dataclass(frozen=True)
class Sampling:
    shuffle: str = "global"
    block_rows: int = 1024
    window_rows: int = 65536

    def window_steps(self, batch_size: int) -> int:
        """Steps per block-shuffle window (at least one)."""
        return max(1, self.window_rows // batch_size)


@dataclass
class EpochPlan:
    """This rank's rows at every step of one epoch."""

    steps: Sequence[np.ndarray]  # sample indices of this rank, one array per step
    batch_rows: Sequence[int]  # size of the GLOBAL batch at each step
    # block mode: (first step, file row ranges of this rank's piece) per window
    windows: list[tuple[int, np.ndarray]] = field(default_factory=list)
    # this rank's rows in each micro-batch of each step (accumulation; [] means one each)
    micro: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.steps)


def share(n: int, rank: int, size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of n items; sizes differ by at most one."""
    q, r = divmod(n, size)
    start = rank * q + min(rank, r)
    return start, start + q + (rank < r)


def ceil_div(a: int, b: int) -> int:
    """The smallest integer >= a / b (a >= 0, b > 0): e.g. the largest share of a among b."""
    return -(-a // b)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return ceil_div(n, batch_size)


def batch_sizes(n: int, batch_size: int) -> np.ndarray:
    """Global batch size of every step: B, ..., B, and the remainder last."""
    sizes = np.full(steps_per_epoch(n, batch_size), batch_size, np.int64)
    sizes[-1] = n - batch_size * (len(sizes) - 1)
    return sizes


def epoch_order(seed: int, epoch: int, n: int, shuffle: bool) -> np.ndarray:
    """The global sample order of an epoch: a function of (seed, epoch) only."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch, 0x5A3D]).permutation(n)


def holdout(seed: int, n: int, fraction: float, shuffle: str = "global") -> np.ndarray:
    """The validation rows of n training rows: sorted, round(fraction * n) of them,
    the first of a permutation keyed by (seed, VAL_STREAM) (with feistel, computed:
    held_order). A function of these only."""
    count = round(fraction * n)
    if count == 0:
        return np.zeros(0, np.int64)
    if shuffle == "feistel":
        return np.sort(held_order(seed, n)(np.arange(count, dtype=np.int64)))
    held = np.random.default_rng([seed, VAL_STREAM]).permutation(n)[:count]
    return np.sort(held).astype(np.int64)


def held_order(seed: int, n: int) -> Feistel:
    """Feistel's hold-out permutation: its first positions are held out, the rest train."""
    return Feistel(n, (seed, VAL_STREAM))


def remaining(n: int, held: np.ndarray) -> np.ndarray | None:
    """The training rows left of n once `held` is held out; None if nothing is held out
    (then every row trains, and the plans are those of a run without validation)."""
    if len(held) == 0:
        return None
    keep = np.ones(n, bool)
    keep[held] = False
    return np.flatnonzero(keep).astype(np.int64)


def runs(rows: np.ndarray) -> np.ndarray:
    """Sorted unique rows as maximal runs of consecutive values: array of [start, stop)."""
    if len(rows) == 0:
        return np.zeros((0, 2), np.int64)
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = rows[np.r_[0, breaks]]
    stops = rows[np.r_[breaks - 1, len(rows) - 1]] + 1
    return np.stack([starts, stops], axis=1).astype(np.int64)


def epoch_plan(sampling: Sampling, seed: int, epoch: int, n: int, batch_size: int,
               rank: int, size: int, accumulate: int = 1, rows: np.ndarray | None = None,
               held: int = 0) -> EpochPlan:
    """The rows of rank `rank` of `size` at every step of epoch `epoch` (with
    `accumulate` micro-batches per step: see the module docstring): of all n rows,
    or only of `rows` (ascending file rows: the training rows left by a hold-out;
    feistel: of the n - held rows its hold-out leaves, with rows None)."""
    if rows is not None:
        assert sampling.shuffle != "block", "block shuffle cannot skip held-out rows"
        n = len(rows)
    if sampling.shuffle == "feistel":
        return _feistel_plan(seed, epoch, n, batch_size, rank, size, accumulate, held)
    sizes = batch_sizes(n, batch_size)
    if sampling.shuffle == "block":
        plan = _block_plan(sampling, seed, epoch, n, batch_size, sizes, rank, size)
        if accumulate > 1:
            plan.micro = [np.diff([share(len(mine), k, accumulate)[0]
                                   for k in range(accumulate)] + [len(mine)])
                          for mine in plan.steps]
        return plan
    order = epoch_order(seed, epoch, n, sampling.shuffle == "global")
    if rows is not None:
        order = rows[order]  # positions in the list of training rows -> file rows
    steps, micro = [], []
    for k, count in enumerate(sizes):
        parts = []
        for m in range(accumulate):
            m_lo, m_hi = share(int(count), m, accumulate)  # the micro-batch in the batch
            lo, hi = share(m_hi - m_lo, rank, size)  # this rank's share of it
            first = k * batch_size + m_lo
            parts.append(order[first + lo:first + hi])
        steps.append(np.concatenate(parts) if accumulate > 1 else parts[0])
        micro.append(np.array([len(p) for p in parts], np.int64))
    return EpochPlan(steps, sizes, micro=micro if accumulate > 1 else [])


class Lazy(Sequence):
    """A sequence whose items are computed when asked, the last two kept (the feed's
    read-ahead thread asks for the next step while the loop holds this one)."""

    def __init__(self, length: int, item: Callable[[int], Any]) -> None:
        self.length, self.item, self.kept = length, item, {}
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(self.length))]
        if not -self.length <= k < self.length:
            raise IndexError(k)
        k %= self.length
        with self.lock:
            value = self.kept.get(k)
        if value is None:
            value = self.item(k)
            with self.lock:
                if len(self.kept) >= 2:
                    self.kept.pop(next(iter(self.kept)))
                self.kept[k] = value
        return value


def _feistel_plan(seed: int, epoch: int, n: int, batch_size: int, rank: int, size: int,
                  accumulate: int, held: int) -> EpochPlan:
    """The global plan's rows with the order computed (feistel.py): step k's rows are
    made when the feed asks for them. With a hold-out of `held` rows, training
    position j is row held_order(held + j) of the file's n rows."""
    train = n - held
    order = Feistel(train, (seed, epoch, 0x5A3D)) if train else None
    hold = held_order(seed, n) if held else None
    steps = steps_per_epoch(train, batch_size)

    def count(k: int) -> int:
        return batch_size if k < steps - 1 else train - batch_size * (steps - 1)

    def parts(k: int) -> list[np.ndarray]:
        out = []
        for m in range(accumulate):
            m_lo, m_hi = share(count(k), m, accumulate)
            lo, hi = share(m_hi - m_lo, rank, size)
            positions = order(np.arange(k * batch_size + m_lo + lo, k * batch_size + m_lo + hi))
            out.append(hold(positions + held) if hold is not None else positions)
        return out
    step_parts = Lazy(steps, parts)  # computed once per step, for rows and micro lengths
    return EpochPlan(Lazy(steps, lambda k: np.concatenate(step_parts[k])), Lazy(steps, count),
                     micro=Lazy(steps, lambda k: np.array([len(p) for p in step_parts[k]]))
                     if accumulate > 1 else [])


def micro_rows(batch_size: int, accumulate: int, size: int) -> tuple[int, int]:
    """(rows of this rank's largest micro-batch, of its largest step): buffer sizes."""
    micro = ceil_div(ceil_div(batch_size, accumulate), size)
    return micro, micro * accumulate if accumulate > 1 else ceil_div(batch_size, size)


def _block_plan(sampling: Sampling, seed: int, epoch: int, n: int, batch_size: int,
                sizes: np.ndarray, rank: int, size: int) -> EpochPlan:
    stream = BlockStream(n, sampling.block_rows,
                         np.random.default_rng([seed, epoch, 0xB10C]))
    window_steps = sampling.window_steps(batch_size)
    # counts[k, r]: rows of rank r at step k (its share of the global batch)
    q, rem = np.divmod(sizes, size)
    counts = q[:, None] + (np.arange(size)[None, :] < rem[:, None])
    steps, windows = [], []
    for w, first in enumerate(range(0, len(sizes), window_steps)):
        last = min(len(sizes), first + window_steps)
        window_counts = counts[first:last]
        pieces = np.r_[0, np.cumsum(window_counts.sum(axis=0))] + first * batch_size
        piece = stream.rows(int(pieces[rank]), int(pieces[rank + 1]))
        windows.append((first, runs(np.sort(piece))))
        piece = np.random.default_rng([seed, epoch, w, rank, 0xB10C]).permutation(piece)
        ends = np.cumsum(window_counts[:, rank])
        steps += np.split(piece, ends[:-1])
    return EpochPlan(steps, sizes, windows)


class BlockStream:
    """The rows of all blocks, blocks in permuted order, without materialising them.

    Position i of the stream is row perm[b] * K + j for the block b and offset j
    that position i falls in (the file's last block may be short). Only the
    block table (n / K entries) is kept; rows(a, b) builds just positions [a, b).
    """

    def __init__(self, n: int, block_rows: int, rng: np.random.Generator) -> None:
        n_blocks = ceil_div(n, block_rows)
        self.block_rows = block_rows
        self.perm = rng.permutation(n_blocks)
        self.lengths = np.where(self.perm == n_blocks - 1, n - (n_blocks - 1) * block_rows,
                                block_rows)
        self.ends = np.cumsum(self.lengths)
        self.starts = self.ends - self.lengths

    def rows(self, a: int, b: int) -> np.ndarray:
        if b <= a:
            return np.zeros(0, np.int64)
        blocks = np.arange(np.searchsorted(self.ends, a, side="right"),
                           np.searchsorted(self.ends, b - 1, side="right") + 1)
        lo = np.maximum(a - self.starts[blocks], 0)
        hi = np.minimum(b - self.starts[blocks], self.lengths[blocks])
        counts = hi - lo
        first = self.perm[blocks] * self.block_rows + lo  # file row of each run's start
        before = np.cumsum(counts) - counts
        return (np.repeat(first - before, counts) + np.arange(counts.sum())).astype(np.int64)
