"""The run directory: config.toml, metrics.jsonl, summary.json, checkpoints, resume.

    RUN_DIR/config.toml           the resolved configuration
    RUN_DIR/metrics.jsonl         one JSON object per epoch
    RUN_DIR/summary.json          written at the end
    RUN_DIR/checkpoints/step-NNNNNNNNN.h5   the last `keep_checkpoints` checkpoints
    RUN_DIR/checkpoint.h5         a hard link to the newest of them

Rank 0 writes everything; every file that is replaced is replaced atomically
(the link too: a new link under a temporary name, renamed over the old one).
Resuming reads the newest checkpoint on rank 0 and broadcasts it.
"""

from __future__ import annotations

import json
import os
import tomllib
from typing import IO

import numpy as np

from . import checkpoint, dist
from .checkpoint import Checkpoint
from .config import TrainConfig, to_toml
from .errors import UsageError
from .fileio import atomic_output, fsync_directory
from .model import MLP
from .optim import Optimizer

# Settings that fix the trajectory: a resumed run must keep them.
TRAJECTORY_KEYS = ("batch_size", "seed", "shuffle", "block_rows", "window_rows", "optimizer",
                   "hidden", "activation", "loss", "dtype")


def checkpoint_path(out: str) -> str:
    return os.path.join(out, "checkpoint.h5")


def prepare(comm: dist.Comm, cfg: TrainConfig) -> None:
    """Collective: rank 0 creates the run directory, refusing to clobber or resume nothing."""
    error = None
    if comm.rank == 0:
        try:
            exists = os.path.exists(checkpoint_path(cfg.out))
            if cfg.resume and not exists:
                raise UsageError(f"--resume: {cfg.out} holds no checkpoint.h5 to resume from")
            if exists and not (cfg.resume or cfg.overwrite):
                raise UsageError(f"{cfg.out} already holds a run (checkpoint.h5); continue it "
                                 f"with --resume, replace it with --overwrite, or choose "
                                 f"another --out")
            history = os.path.join(cfg.out, "checkpoints")
            os.makedirs(history, exist_ok=True)
            if exists and cfg.overwrite:  # nothing of the old run may mix with the new
                for name in os.listdir(history):
                    os.remove(os.path.join(history, name))
                for name in ("checkpoint.h5", "summary.json", "metrics.jsonl"):
                    if os.path.exists(os.path.join(cfg.out, name)):
                        os.remove(os.path.join(cfg.out, name))
        except UsageError as exc:
            error = str(exc)
        except OSError as exc:
            error = f"cannot create run directory {cfg.out}: {exc.strerror}"
    error = dist.first_error(comm, error)
    if error:
        raise UsageError(error)


def write_config(cfg: TrainConfig) -> None:
    with atomic_output(os.path.join(cfg.out, "config.toml")) as tmp, open(tmp, "w") as f:
        f.write(to_toml(cfg))


def open_metrics(cfg: TrainConfig, completed_epochs: int | None) -> IO[str]:
    """metrics.jsonl for appending; on resume, without epochs past the checkpoint."""
    path = os.path.join(cfg.out, "metrics.jsonl")
    if completed_epochs is None:
        return open(path, "w")
    kept = []
    if os.path.exists(path):
        with open(path, errors="replace") as f:
            for line in f:
                try:  # a crash may have cut the last line short
                    if json.loads(line)["epoch"] <= completed_epochs:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    continue
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        f.writelines(kept)
    return open(path, "a")


def write_summary(cfg: TrainConfig, summary: dict) -> None:
    with atomic_output(os.path.join(cfg.out, "summary.json")) as tmp, open(tmp, "w") as f:
        json.dump(summary, f, indent=2)


def save_checkpoint(cfg: TrainConfig, ckpt: Checkpoint, model: MLP) -> str:
    """Rank 0: a new checkpoint file, checkpoint.h5 pointed at it, old ones pruned."""
    history = os.path.join(cfg.out, "checkpoints")
    path = os.path.join(history, f"step-{ckpt.step:09d}.h5")
    checkpoint.save(path, ckpt, model)
    link = checkpoint_path(cfg.out)
    tmp = f"{link}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        os.remove(tmp)
    os.link(path, tmp)
    os.replace(tmp, link)
    fsync_directory(cfg.out)
    for old in sorted(n for n in os.listdir(history) if n.startswith("step-"))[
            :-cfg.keep_checkpoints]:
        os.remove(os.path.join(history, old))
    return path


def resume(comm: dist.Comm, cfg: TrainConfig, model: MLP, optimizer: Optimizer,
           data_shape: tuple[int, int, int]) -> Checkpoint:
    """Collective: load the run's checkpoint into model and optimizer on every rank.

    UsageError on every rank if it does not fit the configuration: a resumed run
    must continue the same trajectory (architecture, data, batch size, seed,
    sampling, optimizer), whatever the number of ranks.
    """
    ckpt, error = None, None
    if comm.rank == 0:
        try:
            ckpt = checkpoint.load(checkpoint_path(cfg.out))
            check_compatible(ckpt, cfg, model, data_shape, comm.size)
        except UsageError as exc:
            error = str(exc)
    error = dist.first_error(comm, error)
    if error:
        raise UsageError(error)
    meta = dist.broadcast_object(comm, ckpt.metadata() if ckpt else None)
    if ckpt is not None:
        ckpt.restore(model)
        optimizer.load_state(ckpt.optimizer_state)
    # arrays travel as buffers, in the same order on every rank
    for buf in (model.params, *optimizer.state().values()):
        dist.broadcast(comm, buf)
    return meta


def check_compatible(ckpt: Checkpoint, cfg: TrainConfig, model: MLP,
                     data_shape: tuple[int, int, int], comm_size: int) -> None:
    saved = tomllib.loads(ckpt.config)
    current = tomllib.loads(to_toml(cfg))
    changed = [f"{k} {saved.get(k)!r} -> {current[k]!r}" for k in TRAJECTORY_KEYS
               if saved.get(k) != current[k]]
    if ckpt.arch != model.arch and not changed:
        changed.append(f"model {ckpt.arch} -> {model.arch}")
    window_steps = max(1, cfg.window_rows // cfg.batch_size)
    if cfg.shuffle == "block" and ckpt.ranks != comm_size and ckpt.step_in_epoch % window_steps:
        changed.append(f"ranks {ckpt.ranks} -> {comm_size} inside a block-shuffle window "
                       f"(resume on {ckpt.ranks} ranks, or from a checkpoint at a window "
                       f"boundary: a multiple of {window_steps} steps into the epoch)")
    if ckpt.data_shape != data_shape:
        changed.append(f"training data (rows, features, outputs) {ckpt.data_shape} -> "
                       f"{data_shape}")
    if changed:
        raise UsageError(f"--resume: the checkpoint in {cfg.out} does not fit this "
                         f"configuration ({'; '.join(changed)}); resume with the run's own "
                         f"settings (its config.toml) or start a new run")
    if ckpt.epoch > cfg.epochs or (ckpt.epoch == cfg.epochs and ckpt.step_in_epoch):
        raise UsageError(f"--resume: the checkpoint is past --epochs {cfg.epochs} (epoch "
                         f"{ckpt.epoch}, step {ckpt.step_in_epoch}); ask for more epochs")


def epoch_sums_to_keep(comm: dist.Comm, ckpt: Checkpoint | None) -> np.ndarray:
    """This rank's starting running sums: the saved global sums on rank 0, zeros elsewhere."""
    if ckpt is None or comm.rank != 0:
        return np.zeros(3)
    return np.array(ckpt.epoch_sums, dtype=np.float64)
