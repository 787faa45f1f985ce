"""What a run says: its start, the line and record of every epoch, the end of a
resumed run that was complete already, and summary.json (its figures reduced over the
ranks first, so rank 0 reports for all)."""

from __future__ import annotations

import json
import os
import shlex
import sys

import numpy as np

from mpinn import __version__
from mpinn.base.cpus import blas_threads, usable_cpus
from mpinn.comm import collectives, console, preflight, world
from mpinn.nn import metrics
from mpinn.nn.schedule import scaled_rate
from mpinn.run.rundir import BEST, SUMMARY
from mpinn.train.session import Session
from mpinn.train.step import evaluate

# environment variables that choose MPI's transports and collectives (MPICH, UCX,
# libfabric, Open MPI, Intel MPI, PSM2): a scaling report lists them
TRANSPORT_VARIABLES = ("MPIR_CVAR_", "UCX_", "FI_", "OMPI_MCA_", "I_MPI_", "PSM2_")


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


def finish(s: Session, record: dict) -> dict:
    """Check the ranks still agree, write summary.json; returns the summary."""
    collectives.check_identical(s.comm, s.model.params, "final weights")
    test = {"loss": record.get("test_loss"), "accuracy": record.get("test_accuracy")}
    if not record:  # --epochs 0: describe the initial model, and save it
        test = evaluate(s.comm, s.model, s.data.test, s.problem)
        s.save()
    summary = summarize(s, record, test)
    s.on_root(lambda run: run.write_summary(summary))
    if s.trace is not None:
        s.trace.write()
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
    times = timer.reduce_all(comm)
    phases, step = times.phases, times.step
    if s.sync.shards is None:  # the all-gather is --shard-optimizer's phase alone
        phases.pop("allgather", None)
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
        "sync": s.cfg.sync, "sync_buckets": len(s.sync.buckets),
        # the gradients on the wire: the dtype, what each rank sends per step, and for a
        # half-precision sync its overflows (steps skipped) and the scale it ended with
        "sync_dtype": s.cfg.sync_dtype, "sync_sent_bytes_per_step": s.sync.sent_bytes,
        "sync_overflows": s.sync.wire.halvings if s.sync.wire else 0,
        "sync_scale": s.sync.wire.scale if s.sync.wire else None,
        # the gradient sync per step: in flight (first send to completion, overlapping
        # backward), and exposed (the step's wait for it after backward: "allreduce")
        "sync_s": times.sync, "sync_exposed_s": phases["allreduce"],
        # --reproducible: the steps redone on wider grids (a value left its grid)
        "reproducible": s.cfg.reproducible,
        "redone_steps": s.learner.redos[0] if s.cfg.reproducible else None,
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
                        f"longer, {resume_hint(out, s.comm.size, ' ' + longer)}")
    return {"ranks": s.comm.size, "epochs": s.cfg.epochs, "steps": p.step, "complete": True}


def log_start(s: Session) -> None:
    cfg, comm, info, arch = s.cfg, s.comm, s.problem.info, s.model.arch
    hosts = len(s.hosts[0])
    console.print0(comm, f"mpinn {__version__}: {comm.size} ranks on {hosts} host"
                      f"{'s' if hosts > 1 else ''} ({world.library()})")
    console.print0(comm, f"data {cfg.data}: {info.n_train} train / {info.n_test} test rows, "
                      f"{info.features} features, {s.problem.outputs} "
                      f"{'classes' if s.problem.classification else 'targets'}")
    if info.n_test == 0:
        console.print0(comm, f"no test rows in {cfg.data}: test scores are skipped (hold out "
                          f"validation rows with --val-fraction, or make a test split with "
                          f"`mpinn data import --test-fraction`)")
    console.print0(comm, f"model {'-'.join(map(str, arch.sizes))} {arch.activation}, "
                      f"{arch.loss}, {arch.n_params:,} params ({arch.dtype}); {cfg.optimizer} "
                      f"lr {s.schedule.rate:g}; global batch {cfg.batch_size} (<= "
                      f"{s.data.buffers.max_rows} per rank"
                      + (f", in micro-batches of <= {s.model.max_rows}" if cfg.accumulate > 1
                         else "") + f"), {s.steps} steps/epoch")
    console.print0(comm, f"lr {s.schedule.rate:g}"
                      + (f" (--lr {cfg.lr:g} x batch {cfg.batch_size} / base batch "
                         f"{cfg.base_batch})" if cfg.lr_scaling == "linear" else "")
                      + f": {s.schedule.describe()}"
                      + (f"; {cfg.accumulate} micro-batches per update" if cfg.accumulate > 1
                         else ""))
    if cfg.reproducible:
        console.print0(comm, f"reproducible: the same bits on any number of ranks, products "
                          f"on integer grids in float64 ({s.model.budget.describe()})")
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
    # train, val, test: the order of a run's life (fit, select, report)
    val = f"  {scores('val')}" if r.get("val_loss") is not None else ""
    return (f"epoch {r['epoch']}/{epochs}  {scores('train')}{val}  {scores('test')}"
            f"  lr {r['lr']:.3g}  {r['samples_per_s']:,.0f} samples/s  {r['seconds']:.2f} s")


def resume_hint(out: str, ranks: int, options: str = "") -> str:
    """'continue with: mpiexec -n 2 mpinn train --out RUN --resume': the command, with the
    launcher and rank count this job was started with (where they can be told)."""
    prefix = preflight.relaunch(ranks)
    command = f"mpinn train --out {shlex.quote(out)} --resume{options}"
    if prefix is None:
        return f"continue with the same launcher and rank count: {command}"
    return f"continue with: {prefix + ' ' if prefix else ''}{command}"
