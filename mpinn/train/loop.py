"""The training loop: set up, epochs of synchronous steps, their guards, checkpoints.

Launch:  mpiexec -n 4 mpinn train data.h5 --out runs/a --hidden 256,128 --epochs 5

Every step: this rank's rows forward and backward, one Allreduce of the summed
gradients (step.py), the same update on every rank. The Allreduce also carries
the ranks' losses, stop requests and bad-input flags, so after it every rank
knows, at the same step and without another collective, whether to stop
(signal: checkpoint, exit 3), whether the input was bad (exit 2) or training
diverged (exit 1; nothing of that step is applied or saved).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from mpinn.base.errors import CollectiveError, Interrupted, UsageError
from mpinn.base.signals import StopRequest
from mpinn.comm import collectives, console, watchdog
from mpinn.comm.world import Comm
from mpinn.data.feed import Batch, Feed
from mpinn.data.layout import LARGE_INPUT
from mpinn.run.config import TrainConfig
from mpinn.run.resolve import to_toml
from mpinn.run.rundir import HISTORY, checkpoint_path
from mpinn.train.progress import EpochProgress
from mpinn.train.session import Session, open_session
from mpinn.train.step import evaluate, train_step
from mpinn.train.summary import (
    EMPTY,
    finish,
    format_epoch,
    log_early_stop,
    log_start,
    report_complete,
    resume_hint,
    split_record,
    train_scores,
)


def train(cfg: TrainConfig, comm: Comm) -> dict:
    """Train as configured; rank 0 writes the run directory. Returns the summary."""
    session = open_session(cfg, comm)  # validated, agreed, run directory locked, resumed
    with closing_together(session), StopRequest() as stop, watched(session, stop):
        if session.complete:
            return report_complete(session)
        log_start(session)
        if session.resumed is None:
            session.on_root(lambda run: run.write_config(to_toml(cfg)))
        checkpointer = Checkpointer(session, cfg.checkpoint_every)
        record: dict = {}
        # non-finite values are the divergence guard's business (one message, from rank 0),
        # not a NumPy warning from every rank
        with np.errstate(all="ignore"):
            for epoch in range(session.progress.epoch, cfg.epochs):
                record = run_epoch(session, epoch, stop, checkpointer)
                if session.watch.exhausted:  # early stopping: a normal end
                    log_early_stop(session)
                    break
        return finish(session, record)


def watched(s: Session, stop: StopRequest) -> contextlib.AbstractContextManager:
    """Collective: the session's collectives wait through comm's stall watchdog (watchdog.py).

    A stop signal shortens a wait only until the ranks have agreed on it (then
    they are on their way to a checkpoint, which may take a while to write).
    """
    def position() -> str:
        p = s.progress
        return (f"global step {p.step + 1} (epoch {p.epoch + 1}, step {p.step_in_epoch + 1} "
                f"of {s.steps}); newest checkpoint: "
                + (f"step {s.saved_step}" if s.saved_step >= 0 else "none"))
    return watchdog.watching(s.comm, s.cfg.stall_timeout,
                         lambda: stop.requested and not s.sync.stop_requested, position)


def run_epoch(s: Session, epoch: int, stop: StopRequest, checkpointer: Checkpointer) -> dict:
    """One epoch (from the resumed step on), then evaluation, metrics and a checkpoint."""
    began, rows, p, timer = time.perf_counter(), 0, s.progress, s.timer
    feed = s.feed(epoch)
    batches = iter(feed)
    report = EpochProgress(s.cfg.progress if s.comm.rank == 0 else "off", s.cfg.log_every,
                           epoch, s.cfg.epochs, s.steps, p.step_in_epoch)
    for _ in range(len(feed)):
        timer.begin_step()
        with timer.phase("data"):  # waiting for this step's rows (read ahead)
            batch = next(batches)
        # forward, backward, the one Allreduce, update (at this step's scheduled rate)
        s.learner.optimizer.lr = s.schedule(p.step)
        result = train_step(s.learner, batch, timer, stop.requested, p.confusion)
        # guards: bad input or divergence, agreed through the Allreduce's control slots
        if not result.applied and not s.sync.overflowed:  # (an overflow of a half-
            raise bad_input(s, batch, feed) if s.sync.bad_input else divergence(s, batch)
        # precision sync skips the step: the residuals keep it, the scale halves)
        p.advance(result.loss, result.correct, len(batch.y))
        if s.trace is not None:
            s.trace.end_step(p.step, timer.step_start, s.sync)
        timer.end_step(batch.rows)
        rows += batch.rows
        report.step(p.step_in_epoch, s.sync.loss, batch.rows)  # rank 0; a clock read mostly
        # checkpoint: every N steps, and at a stop request (then exit 3)
        checkpointer.after_step(feed)
    feed.close()
    report.end()
    # evaluate, log, checkpoint
    collectives.allreduce_sum(s.comm, p.sums)  # loss, correct, rows and the confusion counts
    loss, correct, seen = p.sums[:3]
    seconds = time.perf_counter() - began
    record = {"epoch": epoch + 1, "step": p.step, "train_loss": loss / seen,
              "train_accuracy": correct / seen if s.problem.classification else None,
              **train_scores(p.confusion), **split_record("test", EMPTY),
              **split_record("val", EMPTY),
              "seconds": seconds, "samples_per_s": rows / seconds,
              "lr": s.learner.optimizer.lr}  # the rate of the epoch's last step
    p.end_epoch()
    record.update(evaluate_epoch(s, record))
    # a strictly lower validation loss: saved as best.h5 too
    best = s.watch.observe(record["val_loss"], epoch + 1)
    s.save(record, best=best)
    console.print0(s.comm, format_epoch(record, s.cfg.epochs, s.problem.classification))
    return record


def evaluate_epoch(s: Session, record: dict) -> dict:
    """Collective: the epoch's test and validation scores (val_*: None without held-out
    rows). A non-finite row is bad input (exit 2), but the epoch's training is not lost:
    it is saved first."""
    try:
        test = evaluate(s.comm, s.model, s.data.test, s.problem)
        val = evaluate(s.comm, s.model, s.data.val, s.problem, rows=s.data.val_rows)
    except UsageError as exc:
        s.save(record)
        raise UsageError(f"{exc}; epoch {record['epoch']} is saved without its test scores "
                         f"and validation scores: fix the row, then "
                         f"{resume_hint(s.cfg.out, s.comm.size)}") from None
    return {**split_record("test", test), **split_record("val", val)}


def bad_input(s: Session, batch: Batch, feed: Feed) -> UsageError:
    """Collective: the error for a NaN or infinity some rank read (that rank names the
    row). The step was not applied; the steps before it are saved, not lost."""
    message = collectives.first_error(s.comm, batch.bad)
    feed.close()  # every rank's read-ahead done before the checkpoint's collectives
    if s.progress.step > max(s.saved_step, 0):
        s.save()
        message += (f"; the {s.progress.step} steps before it are saved: fix the row, then "
                    f"{resume_hint(s.cfg.out, s.comm.size)}")
    return UsageError(message)


def divergence(s: Session, batch: Batch) -> CollectiveError:
    """Collective: the error for a step whose reduced loss or gradient is not finite."""
    p, cfg = s.progress, s.cfg
    peak = np.array([float(np.abs(batch.x).max()) if len(batch.x) else 0.0])
    collectives.allreduce_max(s.comm, peak)
    grads = s.sync.grads
    what = f"the batch's mean loss is {s.sync.loss / batch.rows:.4g}" + (
        " and its gradient is not finite" if not np.isfinite(grads).all() else
        " and its gradient's norm overflows" if not np.isfinite(np.dot(grads, grads))
        else "")
    if peak[0] > LARGE_INPUT:
        cause = (f"the input: this batch of {cfg.data} holds values up to |x| = {peak[0]:.3g}; "
                 f"scale the features (`mpinn data inspect --check` flags such values)")
    else:
        cause = (f"the learning rate: --lr {cfg.lr:g} is too large for this model and the "
                 f"{cfg.optimizer} optimizer; lower it")
    kept = (f"the newest checkpoint, {checkpoint_path(cfg.out)}, holds step {s.saved_step} "
            f"(older ones: {os.path.join(cfg.out, HISTORY)})" if s.saved_step >= 0
            else "no checkpoint was written")
    return CollectiveError(f"training diverged at epoch {p.epoch + 1}, step "
                           f"{p.step_in_epoch + 1} of {s.steps} (global step {p.step + 1}): "
                           f"{what}. Likely cause: {cause}. Nothing of this step was applied "
                           f"or saved; {kept}")


@dataclass
class Checkpointer:
    """When a run checkpoints, and how a stop request ends it.

    At every `every`-th global step inside an epoch (0: never mid-epoch), at the
    end of every epoch (the loop calls save), and at the step where the ranks
    agreed on a stop request: then the feed is closed (every rank's read-ahead
    done), the checkpoint written, and the run ends with Interrupted (exit 3).
    """

    session: Session
    every: int

    def after_step(self, feed: Feed) -> None:
        s, p = self.session, self.session.progress
        if s.sync.stop_requested:
            feed.close()
            s.save()
            if s.trace is not None:  # the ranks agreed on the stop: all are here
                s.trace.write()
            raise Interrupted(f"stopped by a signal at epoch {p.epoch + 1}, step "
                              f"{p.step_in_epoch} of {s.steps}; checkpoint written; "
                              f"{resume_hint(s.cfg.out, s.comm.size)}")
        if self.every and p.step % self.every == 0 and p.step_in_epoch < s.steps:
            s.save()


@contextlib.contextmanager
def closing_together(session: Session) -> Iterator[None]:
    """Close the session when every rank ends alike: on success, or on an error all
    ranks raise (mpio's close is collective). After any other error one rank may be
    alone: no collective cleanup then, MPI_Abort ends the job (exits.run_or_abort)."""
    try:
        yield
    except (UsageError, CollectiveError, Interrupted):
        session.close()
        raise
    session.close()
