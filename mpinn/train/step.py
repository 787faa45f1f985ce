"""One synchronous training step, and distributed evaluation: the per-step code that
training, the benchmarks and inference share.

Synchronous data-parallel SGD (docs/design.md): for every global batch of B
samples, rank r sums the per-sample gradients of its contiguous share, one
in-place Allreduce sums those sums over ranks, and every rank divides by B and
applies the same update. So P ranks compute what one rank would, up to the
order of floating-point summation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from mpinn.base.errors import UsageError
from mpinn.comm import collectives
from mpinn.comm.gradsync import GradientSync
from mpinn.comm.world import Comm
from mpinn.data.feed import Batch
from mpinn.data.layout import Problem, nonfinite_message
from mpinn.data.readers import ReadFailure, SplitReader
from mpinn.data.sampler import ceil_div, share
from mpinn.nn import metrics
from mpinn.nn.dropout import Dropout
from mpinn.nn.model import MLP
from mpinn.nn.optim import Optimizer
from mpinn.train.timing import PhaseTimer

EVAL_READ_ROWS = 1024  # rows per read in evaluation, at least


class StepResult(NamedTuple):
    loss: float  # this rank's summed loss (before the update)
    correct: int  # this rank's correct predictions (before the update)
    applied: bool  # False: some rank met bad input, or the reduced loss or gradient is
    #                not finite, or a half-precision sync overflowed (sync says which);
    #                the weights are as they were


@dataclass(frozen=True)
class Learner:
    """What a training step changes, and how: the model (its gradient vector a view of
    the sync's buffer), its optimizer, the task, and what a step does beyond forward,
    backward, sync and update: dropout masks (keyed by the global step and the sample
    indices), gradient clipping."""

    model: MLP
    optimizer: Optimizer
    sync: GradientSync
    problem: Problem
    dropout: Dropout | None = None
    clip_norm: float = 0.0  # 0: off


def train_step(learner: Learner, batch: Batch, timer: PhaseTimer, stop: bool = False,
               confusion: np.ndarray | None = None) -> StepResult:
    """One step on this rank's rows of a global batch (the feed's Batch, as it came).

    stop: this rank was asked to stop (a signal); the ranks agree on it through the
    sync's control slots, as on bad input (a row of the batch named in batch.bad).
    confusion (the flattened C x C counts of the epoch, classification only) gets
    this rank's predictions of the step added, from the logits before the update.

    With micro-batches (gradient accumulation) forward and backward run on each in
    turn, the 2nd..Kth adding into grads, before the one Allreduce. The update is
    skipped when any rank met bad input or the reduced loss or gradient is not
    finite, so a bad step leaves the weights as they were; all ranks see the same
    reduced buffer, so all skip alike.
    """
    model, sync, x, y = learner.model, learner.sync, batch.x, batch.y
    micro = batch.micro if batch.micro.sum() == len(x) else [len(x)]
    loss, correct, first = 0.0, 0, 0
    for k, count in enumerate(micro):
        part = slice(first, first + int(count))
        first += int(count)
        masks = None
        if learner.dropout is not None:
            masks = learner.dropout.masks(batch.step, batch.index[part])
        with timer.phase("forward"):
            logits = model.forward(x[part], masks)
            correct += count_correct(logits, y[part], learner.problem, confusion)
        with timer.phase("backward"):
            loss += model.loss(y[part])
            if k < len(micro) - 1:  # grads <- (+=) sum over the rows
                model.backprop(add=k > 0)
                continue
            # the last micro-batch: the gradient sync starts, its buckets go out while
            # backward computes (the losses and the stop / bad-input flags ride along)
            sync.start(loss, stop, batch.bad is not None)
            model.backprop(add=k > 0, hooks=sync)
    with timer.phase("allreduce"):
        # the rest of the SUM of per-rank gradient sums: the gradient summed over the
        # global batch (what the step waits for after backward: the exposed sync)
        sync.finish()
    timer.add_sync(sync.in_flight)
    with timer.phase("update"):
        applied = not sync.bad_input and sync.finite()
        if applied:
            # Divide by the true global count (not by P, not by the local count):
            # g = (1/B) sum_{i in batch} grad loss_i, whatever the shares were.
            # (--shard-optimizer: this rank's slice of g, and of the parameters)
            grads = sync.update_grads
            grads *= 1.0 / batch.rows
            clip(grads, sync.sq_norm / batch.rows**2, learner.clip_norm)
            learner.optimizer.step(grads)
        sync.end_step(applied)  # a half-precision sync: its residuals and next scale
    if applied and sync.shards:
        with timer.phase("allgather"):  # every rank's updated slice to every rank
            sync.gather_params(model.params)
    return StepResult(loss, correct, applied)


def clip(grads: np.ndarray, sq_norm: float, limit: float) -> None:
    """g <- g * limit / |g| if |g| > limit (limit 0: off). |g|^2 comes from the divergence
    guard's dot product (of the reduced sum, so every rank clips alike: P-invariant)."""
    if limit and sq_norm > limit * limit:
        grads *= limit / math.sqrt(sq_norm)  # a Python float: no cast buffer


def count_correct(logits: np.ndarray, y: np.ndarray, problem: Problem,
                  confusion: np.ndarray | None = None) -> int:
    """Correct predictions of the rows (0 for regression); also added to confusion."""
    if not problem.classification or len(y) == 0:
        return 0
    predicted = logits.argmax(axis=1)
    if confusion is not None:
        metrics.count_confusion(confusion, y, predicted)
    return int(np.count_nonzero(predicted == y))


def evaluate(comm: Comm, model: MLP, reader: SplitReader | None, problem: Problem,
             rows: np.ndarray | None = None) -> dict:
    """Collective: mean loss (and, for classification, accuracy, precision, recall, F1
    and the confusion matrix: metrics.py) of the model on all rows of a split, or on
    the ascending file rows `rows` of it (the held-out validation rows). A split the
    file does not have (reader None) scores as an empty one.

    Each rank evaluates its contiguous share of the rows; the sums of loss, rows
    and the confusion counts are reduced in one Allreduce, then divided. Every
    rank makes the same number of reads (collective with mpio), the last ones maybe
    empty. A non-finite input row, or rows HDF5 cannot read (independent reads), are
    bad input: UsageError on every rank, naming them.
    """
    if reader is None:
        return evaluation(0.0, 0, np.zeros(0), 0)
    n = reader.n if rows is None else len(rows)
    start, stop = share(n, comm.rank, comm.size)
    # reads of at least EVAL_READ_ROWS rows (few, large reads), forward a model's
    # buffer at a time (a micro-batch share with --accumulate)
    rows_per_read = max(model.max_rows, EVAL_READ_ROWS)
    x_buf, y_buf = reader.buffers(rows_per_read)
    classes = problem.outputs if problem.classification else 0
    # loss, rows, ranks that met a non-finite row, then the C x C confusion counts
    sums = np.zeros(3 + classes * classes)
    bad = None
    for first in range(start, start + ceil_div(n, comm.size), rows_per_read):
        indices = np.arange(first, max(first, min(stop, first + rows_per_read)))
        if rows is not None:
            indices = rows[indices]  # positions in the list -> file rows
        if bad is not None and reader.file.io != "mpio":
            continue  # independent reads: nothing more to learn once this rank failed
        try:
            x, y = reader.read(indices, x_buf, y_buf)
        except ReadFailure as exc:
            if reader.file.io == "mpio":  # the others are inside the collective read
                raise
            bad = bad or str(exc)
            continue
        found = reader.nonfinite(x, y)
        if found is not None:
            bad = bad or nonfinite_message(reader.file.path, reader.split, found[0],
                                           int(indices[found[1]]))
            continue
        score(model, x, y, problem, sums, classes)
    sums[2] = bad is not None
    collectives.allreduce_sum(comm, sums)  # integer counts: exact, so the metrics are too
    if sums[2]:
        raise UsageError(collectives.first_error(comm, bad))
    return evaluation(sums[0], int(sums[1]), sums[3:], classes)


def score(model: MLP, x: np.ndarray, y: np.ndarray, problem: Problem, sums: np.ndarray,
          classes: int) -> None:
    """sums[:2] += the rows' summed loss and count; sums[3:] += their confusion counts
    (classification), model.max_rows rows at a time."""
    for lo in range(0, len(y), model.max_rows):
        part = slice(lo, lo + model.max_rows)
        logits = model.forward(x[part])
        count_correct(logits, y[part], problem, sums[3:] if classes else None)
        sums[:2] += (model.loss(y[part]), len(y[part]))


def evaluation(loss_sum: float, rows: int, counts: np.ndarray, classes: int) -> dict:
    """The evaluation of reduced sums: loss per row, and for classification the scores
    of the confusion counts. An empty split scores None (not a perfect or zero score)."""
    result: dict = {"rows": rows, "loss": loss_sum / rows if rows else None,
                    "accuracy": None}
    if classes and rows:
        result.update(metrics.scores(counts.reshape(classes, classes)))
    return result
