"""A run continued from its checkpoint: read on rank 0, checked against the
configuration (a resumed run must continue the same trajectory, whatever the number of
ranks), broadcast to every rank; and the learning-rate schedule taken up where it was."""

from __future__ import annotations

import numpy as np

from mpinn.base.errors import UsageError
from mpinn.comm import collectives
from mpinn.comm.gradsync import GradientSync
from mpinn.comm.world import Comm
from mpinn.data.sampler import Sampling
from mpinn.nn.exact import ExactMLP
from mpinn.nn.model import MLP, Architecture
from mpinn.nn.optim import Optimizer
from mpinn.nn.schedule import Schedule, scaled_rate
from mpinn.run.checkpoint import GRIDS, Checkpoint
from mpinn.run.config import TRAJECTORY_KEYS, TrainConfig, named
from mpinn.run.resolve import to_toml, tomllib
from mpinn.run.rundir import RunDir

# a key missing from an older checkpoint's config had its default then (through TOML,
# as the current configuration is compared: a tuple default reads back as a list)
DEFAULTS = tomllib.loads(to_toml(TrainConfig()))


def resume(comm: Comm, cfg: TrainConfig, run: RunDir | None, model: MLP,
           optimizer: Optimizer, shape: tuple[int, int, int], sync: GradientSync
           ) -> Checkpoint:
    """Collective: load the run's checkpoint into model, optimizer and sync on every rank.

    Rank 0 reads it (checkpoint.h5, or the newest intact one of checkpoints/ if
    that is corrupt: History.load) and broadcasts it. UsageError on every
    rank if none can be read, or if it does not fit the configuration: a resumed
    run must continue the same trajectory (architecture, data, batch size, seed,
    sampling, optimizer), whatever the number of ranks. The optimizer's state is
    whole in the file: each rank takes its slice of it with --shard-optimizer, all
    of it without. Returns the metadata.
    """
    def load() -> Checkpoint:
        assert run is not None
        ckpt = run.history.load()
        check_compatible(ckpt, cfg, model.arch, shape, comm.size)
        ckpt.restore(model)
        whole = {k: (model.arch.n_params,) if np.ndim(v) else ()
                 for k, v in optimizer.state().items()}
        saved = optimizer_part(ckpt)
        if set(saved) != set(whole) or any(np.shape(saved[k]) != whole[k] for k in whole):
            raise UsageError(f"--resume: the optimizer state in the checkpoint of {cfg.out} "
                             f"does not fit the {cfg.optimizer} optimizer of this model")
        run.keep_metrics(ckpt.epoch)
        return ckpt
    ckpt = collectives.root_tries(comm, load)
    meta = collectives.broadcast_object(comm, ckpt.metadata() if ckpt else None)
    # arrays travel as buffers, in the same order on every rank
    collectives.broadcast(comm, model.params)
    sync.load_full_state(optimizer.state(), optimizer_part(ckpt) if ckpt else None)
    # a half-precision sync's residuals and scale (rank 0 has them)
    sync.load_state(ckpt.optimizer_state if ckpt else None)
    if isinstance(model, ExactMLP):  # --reproducible: the grids the run was on
        if ckpt is not None and GRIDS in ckpt.optimizer_state:
            model.grid_e[:] = ckpt.optimizer_state[GRIDS]
        collectives.broadcast(comm, model.grid_e, what="the grid exponents")
    return meta


def optimizer_part(ckpt: Checkpoint) -> dict[str, np.ndarray]:
    """The optimizer's arrays of a checkpoint's /optimizer (the sync's and the grids'
    have their own)."""
    return {k: v for k, v in ckpt.optimizer_state.items()
            if not k.startswith("sync_") and k != GRIDS}


def check_compatible(ckpt: Checkpoint, cfg: TrainConfig, arch: Architecture,
                     shape: tuple[int, int, int], comm_size: int) -> None:
    saved = tomllib.loads(ckpt.config)
    current = tomllib.loads(to_toml(cfg))
    changed = [f"{named(k)} {saved.get(k, DEFAULTS[k])!r} -> {current[k]!r}"
               for k in TRAJECTORY_KEYS if saved.get(k, DEFAULTS[k]) != current[k]]
    if ckpt.arch != arch and not changed:
        changed.append(f"model {ckpt.arch} -> {arch}")
    window_steps = Sampling(cfg.shuffle, cfg.block_rows, cfg.window_rows).window_steps(
        cfg.batch_size)
    if cfg.shuffle == "block" and ckpt.ranks != comm_size and ckpt.step_in_epoch % window_steps:
        changed.append(f"ranks {ckpt.ranks} -> {comm_size} inside a block-shuffle window "
                       f"(resume on {ckpt.ranks} ranks, or from a checkpoint at a window "
                       f"boundary: a multiple of {window_steps} steps into the epoch)")
    if ckpt.data_shape != shape:
        changed.append(f"training data (rows, features, outputs) {ckpt.data_shape} -> {shape}")
    if changed:
        raise UsageError(f"--resume: the checkpoint in {cfg.out} does not fit this "
                         f"configuration ({'; '.join(changed)}); resume with the run's own "
                         f"settings (its config.toml) or start a new run")
    if ckpt.epoch > cfg.epochs or (ckpt.epoch == cfg.epochs and ckpt.step_in_epoch):
        raise UsageError(f"--resume: the checkpoint is past --epochs {cfg.epochs} (epoch "
                         f"{ckpt.epoch}, step {ckpt.step_in_epoch}); ask for more epochs")


def make_schedule(cfg: TrainConfig, steps: int, resumed: Checkpoint | None) -> Schedule:
    """The rate of every step (`steps` per epoch). A resume keeps the checkpoint's
    stretch (anchor) and, if --epochs changed, stretches cosine from the resumed step
    (nn/schedule.py)."""

    def planned(epochs: int, anchor: tuple[int, float] | None) -> Schedule:
        return Schedule(scaled_rate(cfg.lr, cfg.lr_scaling, cfg.batch_size, cfg.base_batch),
                        cfg.lr_schedule, max(1, epochs * steps), cfg.warmup_steps,
                        cfg.lr_step_every, cfg.lr_gamma, cfg.lr_min, anchor)
    if resumed is None:
        return planned(cfg.epochs, None)
    saved_epochs = int(tomllib.loads(resumed.config).get("epochs", cfg.epochs))
    schedule = planned(saved_epochs, resumed.lr_anchor).stretched(resumed.step,
                                                                  max(1, cfg.epochs * steps))
    if cfg.epochs * steps > resumed.step and not schedule(resumed.step) > 0:
        raise UsageError(f"--resume: this run's {cfg.lr_schedule} schedule reached a rate of "
                         f"{schedule(resumed.step):g} at step {resumed.step}: more epochs would "
                         f"not change the model; resume with --lr-min R > 0 (cosine) or "
                         f"--lr-schedule constant --lr R")
    return schedule
