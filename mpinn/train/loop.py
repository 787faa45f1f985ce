"""The training loop: set up, epochs of synchronous steps, the summary.

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
import json
import os
import sys
import time
from collections.abc import Iterator

import numpy as np

from mpinn import __version__
from mpinn.base.cpus import blas_threads, usable_cpus
from mpinn.base.errors import CollectiveError, Interrupted, UsageError
from mpinn.base.signals import StopRequest
from mpinn.comm import collectives, console, preflight, watchdog, world
from mpinn.comm.world import Comm
from mpinn.data.feed import Batch, Feed
from mpinn.data.layout import LARGE_INPUT
from mpinn.nn import metrics
from mpinn.nn.schedule import scaled_rate
from mpinn.run.config import TrainConfig
from mpinn.run.resolve import to_toml
from mpinn.run.rundir import BEST, HISTORY, SUMMARY, checkpoint_path
from mpinn.train.progress import EpochProgress
from mpinn.train.session import Checkpointer, Session, open_session
from mpinn.train.step import Rows, evaluate, train_step

# environment variables that choose MPI's transports and collectives (MPICH, UCX,
# libfabric, Open MPI, Intel MPI, PSM2): a scaling report lists them
TRANSPORT_VARIABLES = ("MPIR_CVAR_", "UCX_", "FI_", "OMPI_MCA_", "I_MPI_", "PSM2_")


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
        s.optimizer.lr = s.schedule(p.step)
        result = train_step(s.sync, s.model, s.optimizer, timer, batch.x, batch.y, batch.rows,
                            s.problem, stop.requested, batch.bad is not None,
                            Rows(batch.index, batch.micro, p.step), s.regime, p.confusion)
        # guards: bad input or divergence, agreed through the Allreduce's control slots
        if not result.applied:
            raise bad_input(s, batch, feed) if s.sync.bad_input else divergence(s, batch)
        p.advance(result.loss, result.correct, len(batch.y))
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
              "lr": s.optimizer.lr}  # the rate of the epoch's last step
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
                         f"and validation scores: fix the row, then continue with: mpinn "
                         f"train --out {s.cfg.out} --resume") from None
    return {**split_record("test", test), **split_record("val", val)}


def train_scores(confusion: np.ndarray | None) -> dict:
    """The epoch's macro precision, recall and F1 of the training predictions (made
    before each update, as the training accuracy), from the reduced confusion counts."""
    if confusion is None:
        return metrics.macro_record("train", {})
    classes = int(round(np.sqrt(confusion.size)))
    return metrics.macro_record("train", metrics.scores(confusion.reshape(classes, classes)))


EMPTY = {"loss": None, "accuracy": None}  # the scores of a split without rows


def split_record(split: str, scores: dict) -> dict:
    """The epoch record's keys of a split's evaluation: loss, accuracy, macro P/R/F1."""
    return {f"{split}_loss": scores["loss"], f"{split}_accuracy": scores["accuracy"],
            **metrics.macro_record(split, scores)}


def bad_input(s: Session, batch: Batch, feed: Feed) -> UsageError:
    """Collective: the error for a NaN or infinity some rank read (that rank names the
    row). The step was not applied; the steps before it are saved, not lost."""
    message = collectives.first_error(s.comm, batch.bad)
    feed.close()  # every rank's read-ahead done before the checkpoint's collectives
    if s.progress.step > max(s.saved_step, 0):
        s.save()
        message += (f"; the {s.progress.step} steps before it are saved: fix the row, then "
                    f"continue with: mpinn train --out {s.cfg.out} --resume")
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


def finish(s: Session, record: dict) -> dict:
    """Check the ranks still agree, write summary.json; returns the summary."""
    collectives.check_identical(s.comm, s.model.params, "final weights")
    test = {"loss": record.get("test_loss"), "accuracy": record.get("test_accuracy")}
    if not record:  # --epochs 0: describe the initial model, and save it
        test = evaluate(s.comm, s.model, s.data.test, s.problem)
        s.save()
    summary = summarize(s, record, test)
    s.on_root(lambda run: run.write_summary(summary))
    loss, acc = summary["test_loss"], summary["test_accuracy"]
    console.print0(s.comm, "done: " + ("no test rows" if loss is None else f"test loss {loss:.4f}")
                + (f", test accuracy {acc:.4f}" if acc is not None else "")
                + f"; summary in {os.path.join(s.cfg.out, SUMMARY)}")
    return summary


def summarize(s: Session, record: dict, test: dict) -> dict:
    """Collective: summary.json's content (reductions over ranks; docs/design.md)."""
    comm, timer, data = s.comm, s.timer, s.data
    peak = np.array([timer.steady_seconds])
    collectives.allreduce_max(comm, peak)
    io_totals = np.array([data.train.bytes_read, data.train.read_seconds])
    collectives.allreduce_sum(comm, io_totals)
    io_modes = collectives.gather_objects(comm, data.file.io_modes)
    phases, step = timer.reduce_with_step(comm)
    step_mean = sum(p["mean"] for p in phases.values())
    return {
        "mpinn_version": __version__, "ranks": comm.size, "hosts": s.hosts[0],
        "ranks_per_host": s.hosts[1], "oversubscribed": preflight.oversubscribed(comm),
        "mpi": world.library(), "environment": environment(), "epochs": s.cfg.epochs,
        "steps": s.progress.step, "steps_this_run": timer.steps + timer.warm,
        "resumed_from_step": s.resumed.step if s.resumed else None,
        "batch_size": s.cfg.batch_size, "params": s.model.arch.n_params,
        "dtype": s.model.arch.dtype,
        "io": {"reader": data.io, "shuffle": s.cfg.shuffle, "prefetch": data.prefetch,
               "train_bytes_read": int(io_totals[0]),
               "read_seconds_per_rank": io_totals[1] / comm.size,
               "mpio_actual_io_modes": merge_counts(io_modes) if data.io == "mpio" else None},
        "data_wait_fraction": phases["data"]["mean"] / step_mean if step_mean else None,
        "final_train_loss": record.get("train_loss"),
        "final_train_accuracy": record.get("train_accuracy"),
        "test_loss": test["loss"], "test_accuracy": test["accuracy"],
        "lr": scaled_rate(s.cfg.lr, s.cfg.lr_scaling, s.cfg.batch_size, s.cfg.base_batch),
        "samples_per_s": timer.steady_samples / peak[0] if peak[0] > 0 else None,
        "step_s": step,
        "step_time_s": phases,
        "allreduce_bytes_per_step": s.sync.buffer.nbytes,
        # validation; the test scores above are the final model's, not best.h5's
        **s.watch.summary(len(data.val_rows), s.progress.epoch),
    }


def environment() -> dict:
    """What a scaling report names of the software (rank 0's view): the MPI library's
    version text, the BLAS and its threads, the variables that choose MPI's transports."""
    blas = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
    return {"mpi_version": world.library_version(),
            "blas": " ".join(str(blas.get(k, "")) for k in ("name", "version")).strip(),
            "blas_threads": blas_threads(os.environ, usable_cpus()),
            "python": sys.version.split()[0], "numpy": np.__version__,
            "variables": {k: v for k, v in sorted(os.environ.items())
                          if k.startswith(TRANSPORT_VARIABLES)}}


def report_complete(s: Session) -> dict:
    """A resumed run with its epochs done. With its summary.json: say so, write nothing.
    Without one (its last evaluation met a bad test row, or it was killed before writing
    the summary): evaluate the test split and write the summary."""
    p, out = s.progress, s.cfg.out
    state = None
    if s.run is not None:  # rank 0
        state = (os.path.exists(os.path.join(out, SUMMARY)),
                 json.loads(s.run.metrics[-1]) if s.run.metrics else {})
    summarized, record = collectives.broadcast_object(s.comm, state)
    if not summarized:
        console.print0(s.comm, f"the run in {out} has done its {p.epoch} epochs but has no "
                            f"summary.json: evaluating the test split and writing it")
        if record:
            test = evaluate(s.comm, s.model, s.data.test, s.problem)
            record.update(split_record("test", test))
        return finish(s, record)
    longer = (f"--early-stopping N (more than its {s.watch.stale} epochs without a lower "
              f"validation loss)" if s.watch.exhausted else "--epochs N")
    console.print0(s.comm, f"the run in {out} is complete: {p.epoch} of {s.cfg.epochs} epochs, "
                        f"{p.step} steps; nothing to do (nothing was written). To train "
                        f"longer: mpinn train --out {out} --resume {longer}")
    return {"ranks": s.comm.size, "epochs": s.cfg.epochs, "steps": p.step, "complete": True}


def log_start(s: Session) -> None:
    cfg, comm, info, arch = s.cfg, s.comm, s.problem.info, s.model.arch
    hosts = len(s.hosts[0])
    console.print0(comm, f"mpinn {__version__}: {comm.size} ranks on {hosts} host"
                      f"{'s' if hosts > 1 else ''} ({world.library()})")
    console.print0(comm, f"data {cfg.data}: {info.n_train} train / {info.n_test} test rows, "
                      f"{info.features} features, {s.problem.outputs} "
                      f"{'classes' if s.problem.classification else 'targets'}")
    console.print0(comm, f"model {'-'.join(map(str, arch.sizes))} {arch.activation}, "
                      f"{arch.loss}, {arch.n_params:,} params ({arch.dtype}); {cfg.optimizer} "
                      f"lr {cfg.lr}; global batch {cfg.batch_size} (<= "
                      f"{s.data.buffers.max_rows} per rank"
                      + (f", in micro-batches of <= {s.model.max_rows}" if cfg.accumulate > 1
                         else "") + f"), {s.steps} steps/epoch")
    console.print0(comm, f"lr {s.schedule.rate:g}"
                      + (f" (--lr {cfg.lr:g} x batch {cfg.batch_size} / base batch "
                         f"{cfg.base_batch})" if cfg.lr_scaling == "linear" else "")
                      + f": {s.schedule.describe()}"
                      + (f"; {cfg.accumulate} micro-batches per update" if cfg.accumulate > 1
                         else ""))
    io, prefetch = s.data.io, s.data.prefetch
    console.print0(comm, f"io {io}{' (collective MPI-IO)' if io == 'mpio' else ''}, "
                      f"shuffle {cfg.shuffle}, prefetch {'on' if prefetch else 'off'}"
                      + (" (MPI lacks MPI_THREAD_MULTIPLE)" if cfg.prefetch and not prefetch
                         else ""))
    if s.resumed is not None:
        r = s.resumed
        console.print0(comm, f"resumed from {r.path}: epoch {r.epoch + 1}, "
                          f"step {r.step_in_epoch} of {s.steps} (global step {r.step})")


def log_early_stop(s: Session) -> None:
    w = s.watch
    console.print0(s.comm, f"early stopping after epoch {s.progress.epoch}: no lower validation "
                        f"loss in {w.stale} epochs; the best, epoch {w.best_epoch} (val loss "
                        f"{w.best_loss:.4f}), is {os.path.join(s.cfg.out, BEST)}; the "
                        f"test scores below are the final model's")


def merge_counts(per_rank: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for counts in per_rank:
        for key, value in counts.items():
            total[key] = total.get(key, 0) + value
    return total


def format_epoch(r: dict, epochs: int, classification: bool) -> str:
    def scores(split: str) -> str:
        if r[f"{split}_loss"] is None:
            return f"{split}: no rows"
        accuracy = f" acc {r[f'{split}_accuracy']:.4f}" if classification else ""
        f1 = r.get(f"{split}_f1")
        return (f"{split} loss {r[f'{split}_loss']:.4f}{accuracy}"
                + (f" f1 {f1:.4f}" if f1 is not None else ""))
    val = f"  {scores('val')}" if r.get("val_loss") is not None else ""
    return (f"epoch {r['epoch']}/{epochs}  {scores('train')}  {scores('test')}{val}"
            f"  lr {r['lr']:.3g}  {r['samples_per_s']:,.0f} samples/s  {r['seconds']:.2f} s")
