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
from dataclasses import dataclass, field
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
from mpinn.nn import fixed, metrics
from mpinn.nn.dropout import Dropout
from mpinn.nn.exact import ExactMLP
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
    cast: np.ndarray | None = None  # --reproducible, float32: the update's gradient
    redos: list[int] = field(default_factory=lambda: [0])  # --reproducible: steps redone


def train_step(learner: Learner, batch: Batch, timer: PhaseTimer, stop: bool = False,
               confusion: np.ndarray | None = None) -> StepResult:
    """One step on this rank's rows of a global batch (the feed's Batch, as it came).

    stop: this rank was asked to stop (a signal); the ranks agree on it through the
    sync's control slots, as on bad input (a row of the batch named in batch.bad).
    confusion (the flattened C x C counts of the epoch, classification only) gets
    this rank's predictions of the step added, from the logits before the update.

    The update is skipped when any rank met bad input or the reduced loss or
    gradient is not finite, so a bad step leaves the weights as they were; all ranks
    see the same reduced buffer, so all skip alike. --reproducible (an ExactMLP): a
    step whose values left their grids on some rank is redone, on every rank, on
    grids from its maxima (nn/exact.py); its loss is the exact global sum on rank 0
    (0 elsewhere), so that the epoch's sum is exact too.
    """
    model, sync = learner.model, learner.sync
    exact = isinstance(model, ExactMLP)
    counts = np.zeros_like(confusion) if exact and confusion is not None else confusion
    for _ in range(2 * model.n_layers + 2 if exact else 1):  # a redo fixes >= 1 grid
        loss, correct = gradient_sum(learner, batch, timer, stop, counts)
        applied = not sync.bad_input and sync.finite()
        if not exact:
            break
        fits = model.fits()
        if not applied:  # bad input or divergence: nothing of it is kept, grids neither
            break  # (a rank with a non-finite row would hide its maxima from the MAX)
        model.adopt()  # the next attempt's or step's grids: this one's maxima
        if fits:
            break
        learner.redos[0] += 1
        if counts is not None:
            counts.fill(0)
    if exact:
        applied = applied and fits  # (values past 2^400: divergence by any measure)
        loss = sync.loss if sync.comm.rank == 0 else 0.0
        if confusion is not None:
            confusion += counts
    with timer.phase("update"):
        if applied:
            # Divide by the true global count (not by P, not by the local count):
            # g = (1/B) sum_{i in batch} grad loss_i, whatever the shares were.
            # (--shard-optimizer: this rank's slice of g, and of the parameters;
            # --reproducible with a float32 model: cast from the exact float64 sum)
            grads = sync.update_grads
            if learner.cast is not None:
                grads = np.multiply(grads, 1.0 / batch.rows, out=learner.cast)
            else:
                grads *= 1.0 / batch.rows
            clip(grads, sync.sq_norm / batch.rows**2, learner.clip_norm)
            learner.optimizer.step(grads)
        sync.end_step(applied)  # a half-precision sync: its residuals and next scale
    if applied and sync.shards:
        with timer.phase("allgather"):  # every rank's updated slice to every rank
            sync.gather_params(model.params)
    return StepResult(loss, correct, applied)


def gradient_sum(learner: Learner, batch: Batch, timer: PhaseTimer, stop: bool,
                 confusion: np.ndarray | None) -> tuple[float, int]:
    """Forward and backward on this rank's rows, and the sync: every rank then has the
    gradient summed over the global batch. Returns this rank's loss and correct count.

    With micro-batches (gradient accumulation) forward and backward run on each in
    turn, the 2nd..Kth adding into grads, before the one Allreduce.
    """
    model, sync, x, y = learner.model, learner.sync, batch.x, batch.y
    micro = batch.micro if batch.micro.sum() == len(x) else [len(x)]
    loss, correct, first, exact = 0.0, 0, 0, 0
    model.prepare()
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
            if sync.exact:  # each row's loss on a grid, summed as integers
                rows = fixed.exact_int(model.row_losses[:int(count)])
                exact = None if exact is None or rows is None else exact + rows
            if k < len(micro) - 1:  # grads <- (+=) sum over the rows
                model.backprop(add=k > 0)
                continue
            # the last micro-batch: the gradient sync starts, its buckets go out while
            # backward computes (the losses and the stop / bad-input flags ride along)
            sync.start(loss, stop, batch.bad is not None, exact)
            model.backprop(add=k > 0, hooks=sync)
    with timer.phase("allreduce"):
        # the rest of the SUM of per-rank gradient sums: the gradient summed over the
        # global batch (what the step waits for after backward: the exposed sync)
        sync.finish()
    timer.add_sync(sync.in_flight)
    return loss, correct


def update_cast(model: MLP, owned: np.ndarray) -> np.ndarray | None:
    """Learner.cast: the update's gradient in the model's dtype, where the gradients are
    not (an ExactMLP of float32: its exact sums are float64); None where they are."""
    return np.zeros_like(owned) if model.grad_dtype != model.dtype else None


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
    bad input: UsageError on every rank, naming them. The loss is summed exactly (each
    row's on a grid of 2^-64, as integers: nn/fixed.py): it does not depend on P given
    the rows' losses, which --reproducible makes P-invariant too, so that early stopping
    decides alike on any P.
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
    # rows, ranks that met a non-finite row, the loss's limbs, the C x C confusion counts
    sums = np.zeros(2 + fixed.LIMBS + classes * classes)
    bad, loss = None, 0
    model.prepare(evaluation=True)
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
        loss = score(model, x, y, problem, sums, loss)
    sums[1] = bad is not None
    fixed.to_limbs(loss, sums[2:])
    collectives.allreduce_sum(comm, sums)  # integer counts: exact, so the metrics are too
    if sums[1]:
        raise UsageError(collectives.first_error(comm, bad))
    return evaluation(fixed.from_limbs(sums[2:]), int(sums[0]), sums[2 + fixed.LIMBS:],
                      classes)


def score(model: MLP, x: np.ndarray, y: np.ndarray, problem: Problem, sums: np.ndarray,
          loss: int | None) -> int | None:
    """sums[0] += the rows' count, sums' confusion counts (classification: after the
    loss's limbs) += theirs, model.max_rows rows at a time; returns loss (fixed.exact_int,
    None: not finite) plus the rows' summed loss."""
    confusion = sums[2 + fixed.LIMBS:]
    for lo in range(0, len(y), model.max_rows):
        part = slice(lo, lo + model.max_rows)
        logits = model.forward(x[part])
        count_correct(logits, y[part], problem, confusion if len(confusion) else None)
        sums[0] += len(y[part])
        model.loss(y[part])
        rows = fixed.exact_int(model.row_losses[:len(y[part])])
        loss = None if loss is None or rows is None else loss + rows
    return loss


def evaluation(loss_sum: float, rows: int, counts: np.ndarray, classes: int) -> dict:
    """The evaluation of reduced sums: loss per row, and for classification the scores
    of the confusion counts. An empty split scores None (not a perfect or zero score)."""
    result: dict = {"rows": rows, "loss": loss_sum / rows if rows else None,
                    "accuracy": None}
    if classes and rows:
        result.update(metrics.scores(counts.reshape(classes, classes)))
    return result
