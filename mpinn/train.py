"""The training loop, distributed evaluation, and the run directory.

Launch:  mpiexec -n 4 mpinn train data.h5 --out runs/a --hidden 256,128 --epochs 5

Synchronous data-parallel SGD (DESIGN.md section 1): for every global batch of
B samples, rank r sums the per-sample gradients of its contiguous share, one
in-place Allreduce sums those sums over ranks, and every rank divides by B and
applies the same update. So P ranks compute what one rank would, up to the
order of floating-point summation.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np

from . import __version__, data, dist, rundir
from .checkpoint import Checkpoint
from .config import TrainConfig, to_toml
from .errors import Interrupted, UsageError
from .feed import Buffers, Feed
from .model import MLP, Architecture
from .optim import make_optimizer
from .readers import DataFile, SplitReader, resolve_io
from .sampler import Sampling, epoch_plan, share, steps_per_epoch
from .signals import StopRequest
from .timing import PhaseTimer

INIT_STREAM = 0x1A17  # generator stream of the initial weights: seed -> weights


@dataclass(frozen=True)
class Problem:
    """What the data file says the model must look like (agreed by all ranks)."""

    info: data.DatasetInfo
    outputs: int  # classes, or regression targets

    @property
    def classification(self) -> bool:
        return self.info.task == "classification"


def check_data(comm: dist.Comm, path: str, loss: str, features: int | None = None,
               outputs: int | None = None) -> Problem:
    """Collective validation of a dataset file (and, optionally, a model's shape).

    Every rank checks the layout and the labels of its own share of rows, then
    all ranks agree on the outcome: UsageError on every rank if any found a fault.
    """
    error, lo, hi, info = None, 0, -1, None
    try:
        info = data.describe(path)
        if info.task == "regression" and loss == "cross-entropy":
            raise UsageError(f"{path} holds regression targets: use --loss mse")
        if info.task == "classification":
            for split in data.SPLITS:
                start, stop = share(info.rows(split), comm.rank, comm.size)
                s_lo, s_hi = data.label_range(path, split, start, stop)
                if stop > start:
                    lo, hi = (s_lo, s_hi) if hi < lo else (min(lo, s_lo), max(hi, s_hi))
    except UsageError as exc:
        error = str(exc)
    reports = dist.gather_objects(comm, (error, lo, hi))
    error = next((e for e, _, _ in reports if e is not None), None)
    if error:
        raise UsageError(error)
    assert info is not None
    n_out = info.outputs
    if info.task == "classification":
        lo = min(r[1] for r in reports if r[2] >= r[1])
        hi = max(r[2] for r in reports if r[2] >= r[1])
        n_out = n_out or hi + 1
        if lo < 0 or hi >= n_out:
            raise UsageError(f"{path}: labels must lie in [0, {n_out - 1}] "
                             f"({n_out} classes), found labels from {lo} to {hi}")
        if n_out < 2:
            raise UsageError(f"{path}: classification needs at least 2 classes, found {n_out}")
    if features is not None and features != info.features:
        raise UsageError(f"{path} has {info.features} features but the model expects {features}")
    if outputs is not None and outputs != n_out:
        kind = "classes" if info.task == "classification" else "targets"
        raise UsageError(f"{path} has {n_out} {kind} but the model has {outputs} outputs")
    return Problem(info, n_out)


def evaluate(comm: dist.Comm, model: MLP, reader: SplitReader, problem: Problem
             ) -> dict[str, float | None]:
    """Collective: mean loss (and accuracy) of the model on all rows of a split.

    Each rank evaluates its contiguous share of the rows; the sums of loss,
    correct predictions and rows are reduced, then divided. Every rank makes
    the same number of reads (collective with mpio), the last ones maybe empty.
    """
    start, stop = share(reader.n, comm.rank, comm.size)
    rows_per_read = model.max_rows
    x_buf, y_buf = reader.buffers(rows_per_read)
    sums = np.zeros(3)  # loss, correct, rows
    largest_share = -(-reader.n // comm.size)
    for first in range(start, start + largest_share, rows_per_read):
        indices = np.arange(first, max(first, min(stop, first + rows_per_read)))
        x, y = reader.read(indices, x_buf, y_buf)
        logits = model.forward(x)
        sums += (model.loss(y), count_correct(logits, y, problem), len(y))
    dist.allreduce_sum(comm, sums)
    if sums[2] == 0:  # an empty split: nothing to report, not a perfect or zero score
        return {"loss": None, "accuracy": None}
    return {"loss": sums[0] / sums[2],
            "accuracy": sums[1] / sums[2] if problem.classification else None}


def count_correct(logits: np.ndarray, y: np.ndarray, problem: Problem) -> int:
    if not problem.classification or len(y) == 0:
        return 0
    return int(np.count_nonzero(logits.argmax(axis=1) == y))


def train(cfg: TrainConfig, comm: dist.Comm) -> dict:
    """Train as configured; rank 0 writes the run directory. Returns the summary."""
    # -- validate everything, then agree, before the first collective of real work
    io = resolve_io(cfg.io)
    problem = check_data(comm, cfg.data, cfg.loss)
    rundir.prepare(comm, cfg)
    info = problem.info
    rank, size = comm.rank, comm.size
    arch = Architecture((info.features, *cfg.hidden, problem.outputs), cfg.activation,
                        cfg.loss, cfg.dtype)
    # the largest share of a global batch (no batch is larger than the data)
    max_rows = max(1, -(-min(cfg.batch_size, info.n_train) // size))
    model = MLP(arch, max_rows)
    optimizer = make_optimizer(cfg.optimizer, model.params, cfg.lr, cfg.weight_decay,
                               cfg.momentum)
    data_shape = (info.n_train, info.features, problem.outputs)
    start = rundir.resume(comm, cfg, model, optimizer, data_shape) if cfg.resume else None
    if start is None:
        model.init(np.random.default_rng([cfg.seed, INIT_STREAM]))
    dist.check_identical(comm, model.params, "initial weights")
    steps = steps_per_epoch(info.n_train, cfg.batch_size)
    sampling = Sampling(cfg.shuffle, cfg.block_rows, cfg.window_rows)
    # mpio reads are MPI collectives: from the prefetch thread only if MPI allows threads
    prefetch = cfg.prefetch and (io != "mpio" or dist.thread_multiple())
    log_start(comm, cfg, problem, arch, max_rows, steps, io, prefetch, start)
    if rank == 0:
        rundir.write_config(cfg)
        metrics_file = rundir.open_metrics(cfg, start.epoch if start else None)

    timer = PhaseTimer()
    datafile = DataFile(cfg.data, io, comm)
    train_reader = datafile.reader("train", max_rows)
    test_reader = datafile.reader("test", max_rows)
    window_steps = max(1, cfg.window_rows // cfg.batch_size)
    window_rows = min(window_steps * max_rows, -(-info.n_train // size) + window_steps)
    buffers = Buffers(train_reader, max_rows, window_rows if cfg.shuffle == "block" else 0)
    steady_seconds, steady_samples, done_here = 0.0, 0, 0
    step = start.step if start else 0
    epoch_stats = rundir.epoch_sums_to_keep(comm, start)  # loss, correct, rows this epoch
    last: dict = {"loss": None, "accuracy": None}
    test: dict = {}
    first_epoch = start.epoch if start else 0
    skip = start.step_in_epoch if start else 0

    def save(epoch: int, step_in_epoch: int) -> None:
        """Collective: rank 0 writes a checkpoint with the epoch's global running sums."""
        sums = epoch_stats.copy()
        dist.allreduce_sum(comm, sums)
        if rank == 0:
            rundir.save_checkpoint(cfg, Checkpoint(
                arch, [], info.task, epoch, step, step_in_epoch, to_toml(cfg), cfg.optimizer,
                optimizer.state(), sums, data_shape, ranks=size), model)

    with StopRequest() as stop:
        for epoch in range(first_epoch, cfg.epochs):
            epoch_start, epoch_rows = time.perf_counter(), 0
            plan = epoch_plan(sampling, cfg.seed, epoch, info.n_train, cfg.batch_size, rank,
                              size)
            feed = Feed(train_reader, plan, buffers, prefetch, first_step=skip)
            batches = iter(feed)
            for step_in_epoch in range(skip + 1, len(plan) + 1):
                step_start = time.perf_counter()
                with timer.phase("data"):  # waiting for this step's rows (read ahead)
                    x, y, batch_rows = next(batches)
                epoch_rows += batch_rows
                model.sync[-1] = stop.requested  # summed with the gradients: any rank stops all
                epoch_stats += (*train_step(comm, model, optimizer, timer, x, y, batch_rows,
                                            problem), len(y))
                timer.steps += 1
                step += 1
                done_here += 1
                if done_here == 1:
                    timer.reset()  # the first step warms caches and BLAS: not steady state
                else:
                    steady_seconds += time.perf_counter() - step_start
                    steady_samples += batch_rows
                if model.sync[-1] > 0:
                    feed.close()
                    save(epoch, step_in_epoch)
                    datafile.close()  # collectively, before MPI shuts down
                    raise Interrupted(f"stopped by a signal at epoch {epoch + 1}, step "
                                      f"{step_in_epoch} of {len(plan)}; checkpoint written; "
                                      f"continue with: mpinn train --out {cfg.out} --resume")
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 \
                        and step_in_epoch < len(plan):
                    save(epoch, step_in_epoch)
            feed.close()
            skip = 0
            dist.allreduce_sum(comm, epoch_stats)
            epoch_seconds = time.perf_counter() - epoch_start
            last = {"loss": epoch_stats[0] / epoch_stats[2],
                    "accuracy": epoch_stats[1] / epoch_stats[2] if problem.classification
                    else None}
            epoch_stats[:] = 0
            test = evaluate(comm, model, test_reader, problem)
            record = {"epoch": epoch + 1, "step": step, "train_loss": last["loss"],
                      "train_accuracy": last["accuracy"], "test_loss": test["loss"],
                      "test_accuracy": test["accuracy"], "seconds": epoch_seconds,
                      "samples_per_s": epoch_rows / epoch_seconds}
            if rank == 0:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            save(epoch + 1, 0)
            dist.print0(comm, format_epoch(record, cfg.epochs, problem.classification))
    dist.check_identical(comm, model.params, "final weights")
    if not test:  # --epochs 0, or resumed at the end: describe the model as it is
        test = evaluate(comm, model, test_reader, problem)
        if start is None:
            save(0, 0)
    datafile.close()

    peak = np.array([steady_seconds])
    dist.allreduce_max(comm, peak)
    io_totals = np.array([train_reader.bytes_read, train_reader.read_seconds])
    dist.allreduce_sum(comm, io_totals)
    io_modes = dist.gather_objects(comm, datafile.io_modes)
    phases = timer.reduce(comm)
    step_mean = sum(p["mean"] for p in phases.values())
    summary = {
        "ranks": size, "mpi": dist.library(), "epochs": cfg.epochs, "steps": step,
        "steps_this_run": done_here, "resumed_from_step": start.step if start else None,
        "batch_size": cfg.batch_size, "params": arch.n_params, "dtype": arch.dtype,
        "io": {"reader": io, "shuffle": cfg.shuffle, "prefetch": prefetch,
               "train_bytes_read": int(io_totals[0]),
               "read_seconds_per_rank": io_totals[1] / size,
               "mpio_actual_io_modes": merge_counts(io_modes) if io == "mpio" else None},
        "data_wait_fraction": phases["data"]["mean"] / step_mean if step_mean else None,
        "final_train_loss": last["loss"], "final_train_accuracy": last["accuracy"],
        "test_loss": test.get("loss"), "test_accuracy": test.get("accuracy"),
        "samples_per_s": steady_samples / peak[0] if peak[0] > 0 else None,
        "step_time_s": phases,
        "allreduce_bytes_per_step": model.sync.nbytes,
    }
    if rank == 0:
        metrics_file.close()
        rundir.write_summary(cfg, summary)
        loss, acc = summary["test_loss"], summary["test_accuracy"]
        dist.print0(comm, "done: " + ("no test rows" if loss is None else f"test loss {loss:.4f}")
                          + (f", test accuracy {acc:.4f}" if acc is not None else "")
                          + f"; summary in {os.path.join(cfg.out, 'summary.json')}")
    return summary


def log_start(comm, cfg: TrainConfig, problem: Problem, arch: Architecture, max_rows: int,
              steps: int, io: str, prefetch: bool, start: Checkpoint | None) -> None:
    info = problem.info
    dist.print0(comm, f"mpinn {__version__}: {comm.size} ranks ({dist.library()})")
    dist.print0(comm, f"data {cfg.data}: {info.n_train} train / {info.n_test} test rows, "
                      f"{info.features} features, {problem.outputs} "
                      f"{'classes' if problem.classification else 'targets'}")
    dist.print0(comm, f"model {'-'.join(map(str, arch.sizes))} {arch.activation}, "
                      f"{arch.loss}, {arch.n_params:,} params ({arch.dtype}); {cfg.optimizer} "
                      f"lr {cfg.lr}; global batch {cfg.batch_size} (<= {max_rows} per rank), "
                      f"{steps} steps/epoch")
    dist.print0(comm, f"io {io}{' (collective MPI-IO)' if io == 'mpio' else ''}, "
                      f"shuffle {cfg.shuffle}, prefetch {'on' if prefetch else 'off'}"
                      + (" (MPI lacks MPI_THREAD_MULTIPLE)" if cfg.prefetch and not prefetch
                         else ""))
    if start is not None:
        dist.print0(comm, f"resumed from {rundir.checkpoint_path(cfg.out)}: epoch "
                          f"{start.epoch + 1}, step {start.step_in_epoch} of {steps} "
                          f"(global step {start.step})")


def train_step(comm: dist.Comm, model: MLP, optimizer, timer: PhaseTimer, x: np.ndarray,
               y: np.ndarray, batch_rows: int, problem: Problem) -> tuple[float, int]:
    """One synchronous step on this rank's rows of a global batch of batch_rows samples.

    Returns this rank's summed loss and correct predictions (before the update).
    """
    with timer.phase("forward"):
        logits = model.forward(x)
        correct = count_correct(logits, y, problem)
    with timer.phase("backward"):
        loss = model.backward(y)  # grads <- sum over this rank's rows
    with timer.phase("allreduce"):
        # SUM of per-rank gradient sums: the gradient summed over the global batch
        # (model.sync is the gradients plus one control slot, see model.py).
        dist.allreduce_sum(comm, model.sync)
    with timer.phase("update"):
        # Divide by the true global count (not by P, not by the local count):
        # g = (1/B) sum_{i in batch} grad loss_i, whatever the shares were.
        model.grads *= 1.0 / batch_rows
        optimizer.step(model.grads)
    return loss, correct


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
        return f"{split} loss {r[f'{split}_loss']:.4f}{accuracy}"
    return (f"epoch {r['epoch']}/{epochs}  {scores('train')}  {scores('test')}"
            f"  {r['samples_per_s']:,.0f} samples/s  {r['seconds']:.2f} s")
