"""A training run set up: everything the loop needs, validated and agreed before the
first step, and the checkpoint of the run as it stands.

open_session() validates the data on every rank, takes the run directory (rank 0:
lock, tidy, writability), builds the learner (the model around the gradient sync's
buffer, its optimizer, dropout and clipping), resumes from the run's checkpoint
(resume.py) or initialises from the seed, and opens the readers. Every step that can
fail for one rank only ends in an agreement (collectives.first_error,
collectives.root_tries), so all ranks raise the same error alike.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from mpinn.base.errors import UsageError
from mpinn.base.files import check_writable
from mpinn.comm import collectives, preflight, world
from mpinn.comm.gradsync import GradientSync
from mpinn.comm.world import Comm
from mpinn.data.feed import Buffers, Feed
from mpinn.data.holdout import EarlyStopping, held_out_rows
from mpinn.data.layout import Problem, check_data
from mpinn.data.readers import DataFile, SplitReader, resolve_io
from mpinn.data.sampler import (
    Sampling,
    ceil_div,
    epoch_plan,
    micro_rows,
    remaining,
    steps_per_epoch,
)
from mpinn.nn.dropout import Dropout
from mpinn.nn.exact import ExactMLP
from mpinn.nn.fixed import Budget
from mpinn.nn.model import MLP, Architecture
from mpinn.nn.optim import make_optimizer
from mpinn.nn.schedule import Schedule
from mpinn.run import checkpoint
from mpinn.run.checkpoint import GRIDS, Checkpoint
from mpinn.run.config import TrainConfig, named
from mpinn.run.resolve import to_toml
from mpinn.run.rundir import RunDir
from mpinn.train.resume import make_schedule, resume
from mpinn.train.step import Learner, update_cast
from mpinn.train.timing import PhaseTimer
from mpinn.train.trace import CHECKPOINT_TID, Trace

T = TypeVar("T")
INIT_STREAM = 0x1A17  # generator stream of the initial weights: seed -> weights



@dataclass
class Progress:
    """Where a run stands, and this rank's running sums of the current epoch."""

    epoch: int = 0  # completed epochs
    step: int = 0  # global steps done
    step_in_epoch: int = 0  # steps done of epoch `epoch`
    # loss, correct, rows, then (classification) the flattened C x C confusion counts:
    # one vector, so one Allreduce at the epoch's end reduces them all
    sums: np.ndarray = field(default_factory=lambda: np.zeros(3))

    @property
    def confusion(self) -> np.ndarray | None:
        """The epoch's confusion counts (a view of sums), None for regression."""
        return self.sums[3:] if len(self.sums) > 3 else None

    def advance(self, loss: float, correct: int, rows: int) -> None:
        self.step += 1
        self.step_in_epoch += 1
        self.sums[:3] += (loss, correct, rows)

    def end_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        self.sums[:] = 0


@dataclass(kw_only=True)
class Reading:
    """The training data as every rank reads it."""

    io: str  # independent | mpio
    prefetch: bool
    sampling: Sampling
    file: DataFile
    train: SplitReader
    test: SplitReader | None  # None: the file has no test split
    buffers: Buffers
    val: SplitReader  # the train split again: evaluating never counts as training reads
    val_rows: np.ndarray  # held-out file rows of the train split (sorted; maybe none)
    train_rows: np.ndarray | None  # the others; None: every row trains (or feistel's plan
    #                                 maps its positions past the hold-out: no list)

    @property
    def train_count(self) -> int:
        if self.train_rows is None:
            return self.train.n - (len(self.val_rows) if self.sampling.shuffle == "feistel"
                                   else 0)
        return len(self.train_rows)


@dataclass(kw_only=True)
class Session:
    cfg: TrainConfig
    comm: Comm
    learner: Learner  # the model, its optimizer, the sync; dropout, clipping
    run: RunDir | None  # the run directory, on rank 0 (None on the others)
    resumed: Checkpoint | None  # metadata of the checkpoint this run continues
    progress: Progress
    data: Reading
    watch: EarlyStopping  # validation loss: best so far, stale epochs (data/holdout.py)
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    saved_step: int = -1  # the step of the newest checkpoint on disk (-1: none)
    config_pending: bool = False  # a resumed run's config.toml, written with its checkpoint
    active_feed: Feed | None = None  # the epoch's feed, whose threads may still read
    hosts: tuple[list[str], list[int]] = ([], [])  # preflight.placement: hosts, ranks on each
    schedule: Schedule = field(default_factory=lambda: Schedule(0.0))  # the rate per step
    trace: Trace | None = None  # --trace: the run's timeline (trace.py)

    @property
    def model(self) -> MLP:
        return self.learner.model

    @property
    def sync(self) -> GradientSync:
        return self.learner.sync

    @property
    def problem(self) -> Problem:
        return self.learner.problem

    @property
    def steps(self) -> int:
        return steps_per_epoch(self.data.train_count, self.cfg.batch_size)

    @property
    def complete(self) -> bool:
        """Resumed at the end: --epochs done (or stopped early), nothing left to train."""
        return self.resumed is not None and (self.progress.epoch >= self.cfg.epochs
                                             or self.watch.exhausted)

    def feed(self, epoch: int) -> Feed:
        """This rank's batches of an epoch (from the resumed step in the first one)."""
        cfg, data, comm = self.cfg, self.data, self.comm
        plan = epoch_plan(data.sampling, cfg.seed, epoch, data.train.n, cfg.batch_size,
                          comm.rank, comm.size, cfg.accumulate, rows=data.train_rows,
                          held=len(data.val_rows))
        p = self.progress
        self.active_feed = Feed(data.train, plan, data.buffers, data.prefetch,
                                p.step_in_epoch, p.step - p.step_in_epoch)
        if self.trace is not None:
            self.active_feed.observe = self.trace.read
        return self.active_feed

    def on_root(self, write: Callable[[RunDir], object]) -> None:
        """Collective: rank 0 applies write to the run directory; all learn if it failed."""
        collectives.root_tries(self.comm, lambda: write(self.run))

    def save(self, record: dict | None = None, best: bool = False) -> None:
        """Collective: a checkpoint of the run as it stands (rank 0 writes it), after
        the epoch's metrics line if one is given; best: also as best.h5, first (a
        crash between the two resumes before this epoch, which writes it again).

        The epoch's running sums are reduced first, so the file holds the global
        sums. The file's image is built (and refused if not finite) before anything
        is written; then the metrics line: a crash between it and the checkpoint
        leaves a line past the checkpoint, which a resume drops. A resumed run
        rewrites config.toml only now, with its first new checkpoint: a resume that
        fails before that leaves the run as it was.
        """
        p, cfg = self.progress, self.cfg
        sums = p.sums.copy()
        collectives.allreduce_sum(self.comm, sums)
        ckpt = Checkpoint(arch=self.model.arch, task=self.problem.info.task, epoch=p.epoch,
                          step=p.step, step_in_epoch=p.step_in_epoch, config=to_toml(cfg),
                          optimizer=cfg.optimizer,
                          optimizer_state={**self.sync.full_state(
                                              self.learner.optimizer.state()),
                                           **self.sync.saved_state(),
                                           **grid_state(self.model)},
                          epoch_sums=sums[:3], epoch_confusion=sums[3:],
                          data_shape=data_shape(self.problem),
                          ranks=self.comm.size, lr_anchor=self.schedule.anchor,
                          best_val_loss=self.watch.best_loss,
                          best_epoch=self.watch.best_epoch, stale_epochs=self.watch.stale)

        def write(run: RunDir) -> None:
            image = checkpoint.image(ckpt, self.model)
            if record is not None:
                run.append_metrics(record)
            if best:
                run.save_best(image)
            run.history.save(ckpt.step, image)
            if self.config_pending:
                run.write_config(ckpt.config)
        with self.trace.span("checkpoint", CHECKPOINT_TID) if self.trace else nullcontext():
            self.on_root(write)
        self.saved_step, self.config_pending = p.step, False

    def close(self) -> None:
        """Stop the feed's threads, close the data file (collective with mpio) and
        release the run directory. Only when all ranks close alike."""
        if self.active_feed is not None:
            self.active_feed.close()
        self.data.file.close()
        if self.run is not None:
            self.run.close()


def grid_state(model: MLP) -> dict[str, np.ndarray]:
    """What a checkpoint keeps of an ExactMLP (--reproducible): its grid exponents, so
    that a resumed run continues on the same grids."""
    return {GRIDS: model.grid_e.copy()} if isinstance(model, ExactMLP) else {}


def data_shape(problem: Problem) -> tuple[int, int, int]:
    return problem.info.n_train, problem.info.features, problem.outputs


def open_session(cfg: TrainConfig, comm: Comm) -> Session:
    """Collective: validate, agree, take the run directory, build and resume the model."""
    io = resolve_io(cfg.io)
    problem = check_data(comm, cfg.data, cfg.loss)
    held = held_out_rows(cfg.seed, problem.info.n_train, cfg.val_fraction,  # alike on all
                         cfg.shuffle)
    # the largest share of a global batch (no batch is larger than the data), and of
    # a micro-batch: the model's buffers hold one micro-batch (data/sampler.py)
    model_rows, max_rows = (max(1, r) for r in micro_rows(
        min(cfg.batch_size, problem.info.n_train), cfg.accumulate, comm.size))
    arch = Architecture((problem.info.features, *cfg.hidden, problem.outputs),
                        cfg.activation, cfg.loss, cfg.dtype)
    hosts = preflight.placement(comm)
    learner = build_learner(comm, cfg, problem, arch, model_rows, hosts)
    model = learner.model
    if cfg.trace:  # refused now, not after the run
        collectives.root_tries(comm, lambda: check_writable(cfg.trace))
    run = collectives.root_tries(comm, lambda: RunDir.open(cfg))
    try:
        resumed = resume(comm, cfg, run, model, learner.optimizer, data_shape(problem),
                         learner.sync) \
            if cfg.resume else None
        if resumed is None:
            model.init(np.random.default_rng([cfg.seed, INIT_STREAM]))
        collectives.check_identical(comm, model.params, "initial weights")
        classes = problem.outputs if problem.classification else 0
        sums = np.zeros(3 + classes * classes)
        if resumed is not None and comm.rank == 0:  # the others' sums start from zero
            sums[:3] = resumed.epoch_sums
            if len(resumed.epoch_confusion) == classes * classes:  # older checkpoints: none
                sums[3:] = resumed.epoch_confusion
        progress = Progress(resumed.epoch, resumed.step, resumed.step_in_epoch, sums) \
            if resumed is not None else Progress(sums=sums)
        watch = EarlyStopping(patience=cfg.early_stopping)
        if resumed is not None:
            watch = EarlyStopping(patience=cfg.early_stopping, best_loss=resumed.best_val_loss,
                                  best_epoch=resumed.best_epoch, stale=resumed.stale_epochs)
        schedule = make_schedule(cfg, steps_per_epoch(problem.info.n_train - len(held),
                                                      cfg.batch_size), resumed)
        data = open_reading(cfg, comm, io, max_rows, problem, held)
        # nothing can refuse the run any more: an --overwrite removes the old one now
        collectives.root_tries(comm, lambda: run.remove_old_run())
        session = Session(cfg=cfg, comm=comm, hosts=hosts,
                          learner=learner, run=run, resumed=resumed, progress=progress,
                          data=data, watch=watch, saved_step=resumed.step if resumed else -1,
                          config_pending=resumed is not None, schedule=schedule)
        if cfg.trace:
            session.trace = Trace(comm, cfg.trace, cfg.trace_steps)
            session.timer.trace = session.trace.phase
        return session
    except BaseException:
        if run is not None:  # refused (or failed) before the run wrote anything
            run.abandon()
        raise


def build_learner(comm: Comm, cfg: TrainConfig, problem: Problem, arch: Architecture,
                  max_rows: int, hosts: tuple[list[str], list[int]]) -> Learner:
    """Collective: the sync buffer, the model around it, the optimizer and the dropout
    masks (for max_rows rows), or a UsageError on every rank if they do not fit in some
    rank's memory."""
    budget = grids(cfg, arch)

    def build() -> Learner:
        sync = GradientSync(comm, arch.n_params, arch.dtype, cfg.sync,
                            int(cfg.bucket_mb * 1e6), test_in_flight=len(hosts[0]) > 1,
                            wire=None if cfg.sync_dtype == "model" else cfg.sync_dtype,
                            shard=cfg.shard_optimizer,
                            exact=budget.exponents if budget else 0)
        model = build_model(arch, max_rows, sync, budget, dropout=any(cfg.dropout),
                            accumulate=cfg.accumulate > 1)
        owned = model.params if sync.shards is None else \
            model.params[sync.shards.lo:sync.shards.hi]  # --shard-optimizer: its slice
        optimizer = make_optimizer(cfg.optimizer, owned, cfg.lr, cfg.weight_decay,
                                   cfg.momentum, cfg.l1)
        dropout = Dropout(cfg.dropout, cfg.hidden, max_rows, cfg.seed, cfg.dtype) \
            if any(cfg.dropout) else None
        return Learner(model, optimizer, sync, problem, dropout, cfg.clip_norm,
                       update_cast(model, owned))
    gib = arch.n_params * np.dtype(arch.dtype).itemsize / 2**30
    return affordable(comm, build, (
        f"the model {'-'.join(map(str, arch.sizes))} has {arch.n_params:,} parameters "
        f"({gib:.3g} GiB each for the weights, the gradients and every {cfg.optimizer} state "
        f"array)", "choose smaller --hidden layers"
        + (" or --dtype float32" if arch.dtype == "float64" else "")))


def grids(cfg: TrainConfig, arch: Architecture) -> Budget | None:
    """--reproducible: the bits of every grid (nn/fixed.py), or a UsageError (on every
    rank alike) if the batch and the widths leave too few; None without it."""
    if not cfg.reproducible:
        return None
    try:
        return Budget.plan(arch.sizes, cfg.batch_size)
    except ValueError as exc:
        raise UsageError(f"{named('reproducible')}: {exc}; choose a smaller "
                         f"{named('batch_size')} or narrower layers") from None


def build_model(arch: Architecture, max_rows: int, sync: GradientSync,
                budget: Budget | None, **buffers: bool) -> MLP:
    """The model around the sync's gradient buffer: an ExactMLP, whose grid exponents
    the sync reduces, with a budget (--reproducible); an MLP without."""
    if budget is None:
        return MLP(arch, max_rows, grads=sync.grads, **buffers)
    return ExactMLP(arch, max_rows, budget, seen=sync.extremes[:-1], grads=sync.grads,
                    **buffers)


def affordable(comm: Comm, build: Callable[[], T], what: tuple[str, str]) -> T:
    """Collective: build(), or a UsageError on every rank if some rank ran out of memory
    (what: the thing built, and the advice)."""
    built, problem = None, None
    try:
        built = build()
    except MemoryError:
        problem = f"{what[0]}: it does not fit in rank {comm.rank}'s memory; {what[1]}"
    problem = collectives.first_error(comm, problem)
    if problem is not None:
        raise UsageError(problem)
    return built  # type: ignore[return-value]


def open_reading(cfg: TrainConfig, comm: Comm, io: str, max_rows: int,
                 problem: Problem, held: np.ndarray) -> Reading:
    # mpio reads are MPI collectives: from the prefetch thread only if MPI allows threads
    prefetch = cfg.prefetch and (io != "mpio" or world.thread_multiple())
    sampling = Sampling(cfg.shuffle, cfg.block_rows, cfg.window_rows)
    datafile = DataFile(cfg.data, io, comm)
    train = datafile.reader("train", max_rows)
    # a window holds at most an epoch's steps: this rank's share of the rows, or less
    window_steps = min(sampling.window_steps(cfg.batch_size),
                       steps_per_epoch(problem.info.n_train, cfg.batch_size))
    window_rows = min(window_steps * max_rows,
                      ceil_div(problem.info.n_train, comm.size) + window_steps)
    buffers = affordable(comm, lambda: Buffers(
        train, max_rows, window_rows if cfg.shuffle == "block" else 0), (
        f"--shuffle block's window of {window_rows:,} rows per rank",
        "choose a smaller --window-rows"))
    return Reading(io=io, prefetch=prefetch, file=datafile, train=train,
                   test=datafile.reader("test", max_rows) if "test" in problem.info.splits
                   else None, buffers=buffers, sampling=sampling,
                   val=datafile.reader("train", max_rows), val_rows=held,
                   train_rows=None if cfg.shuffle == "feistel"
                   else remaining(problem.info.n_train, held))
