"""Checkpoints: one HDF5 file, readable with plain h5py, written atomically.

Layout:
    /model/W{i} (fan_in x fan_out), /model/b{i}   layer i, i = 0 .. L-1
    /model attrs: sizes, activation, loss, dtype
    /optimizer/<name>       optimizer state arrays (velocity; m, v, t), attr: optimizer
    /progress/epoch_sums    the epoch's running sums so far (loss, correct, rows; all ranks)
    / attrs: format, mpinn_version, task, config (the resolved TOML),
             epoch (completed epochs), step (global steps done),
             step_in_epoch (steps done of epoch `epoch`; 0 at an epoch boundary),
             data_rows, data_features, data_outputs (the training data's shape),
             ranks (the number of ranks that wrote it)

That is everything needed to continue exactly: the sampler's position is
(epoch, step_in_epoch) because every epoch's plan is a pure function of the
seed and the epoch; the initial weights' generator is never used again.

The file is built in memory (HDF5's core driver, `image`) and its bytes are
written by rundir.py with fileio.write_atomically: space reserved first, then a
temporary file, fsync, rename. A crash leaves the previous checkpoint or the new one, never a
partial file; a full disk is a clear error, not a crash inside HDF5's close;
and a model with a NaN or an infinity is refused, never written.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import h5py
import numpy as np

from . import __version__
from .data import all_finite
from .errors import CollectiveError, UsageError
from .fileio import open_hdf5
from .model import MLP, Architecture

FORMAT = "mpinn-checkpoint-1"


@dataclass(kw_only=True)
class Checkpoint:
    arch: Architecture
    weights: list[np.ndarray] = field(default_factory=list)  # W0, b0, W1, b1, ...
    task: str
    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0
    config: str = ""
    optimizer: str = ""
    optimizer_state: dict[str, np.ndarray] = field(default_factory=dict)
    epoch_sums: np.ndarray = field(default_factory=lambda: np.zeros(3))
    data_shape: tuple[int, int, int] = (0, 0, 0)  # rows, features, outputs
    version: str = __version__
    ranks: int = 1  # that wrote it (block shuffle's windows depend on it)

    def restore(self, model: MLP) -> None:
        """Copy the weights into a model of the same architecture."""
        assert model.arch == self.arch, (model.arch, self.arch)
        views = [v for pair in zip(model.W, model.b) for v in pair]
        for view, value in zip(views, self.weights):
            view[...] = value

    def metadata(self) -> Checkpoint:
        """This checkpoint without its arrays (small enough to broadcast as an object)."""
        return replace(self, weights=[], optimizer_state={})


def image(ckpt: Checkpoint, model: MLP) -> bytes:
    """The bytes of the checkpoint file of ckpt's metadata and optimizer state with model's
    weights. CollectiveError if any value is not finite (a diverged model is never saved)."""
    arrays = [model.params, *ckpt.optimizer_state.values()]
    if not all(all_finite(a) for a in arrays):
        raise CollectiveError(f"refusing to write a checkpoint with non-finite values at step "
                              f"{ckpt.step}; the newest good checkpoint stays as it is")
    # grow the in-memory file in one step, not HDF5's default 64 KiB at a time
    size = sum(a.nbytes for a in arrays) + (1 << 20)
    with h5py.File(f"checkpoint-{id(ckpt)}", "w", driver="core", backing_store=False,
                   block_size=size) as f:
        f.attrs.update(format=FORMAT, mpinn_version=ckpt.version, epoch=ckpt.epoch,
                       step=ckpt.step, step_in_epoch=ckpt.step_in_epoch, task=ckpt.task,
                       config=ckpt.config, data_rows=ckpt.data_shape[0],
                       data_features=ckpt.data_shape[1], data_outputs=ckpt.data_shape[2],
                       ranks=ckpt.ranks)
        g = f.create_group("model")
        g.attrs.update(sizes=np.array(model.arch.sizes, np.int64),
                       activation=model.arch.activation, loss=model.arch.loss,
                       dtype=model.arch.dtype)
        for i, (w, b) in enumerate(zip(model.W, model.b)):
            g.create_dataset(f"W{i}", data=w)
            g.create_dataset(f"b{i}", data=b)
        o = f.create_group("optimizer")
        o.attrs["optimizer"] = ckpt.optimizer
        for name, value in ckpt.optimizer_state.items():
            o.create_dataset(name, data=value)
        f.create_dataset("progress/epoch_sums", data=ckpt.epoch_sums)
        f.flush()
        return f.id.get_file_image()


def load(path: str) -> Checkpoint:
    """Read a checkpoint; UsageError if the file is missing or not a checkpoint."""
    with open_hdf5(path, "checkpoint") as f:
        if f.attrs.get("format") != FORMAT or "model" not in f:
            raise UsageError(f"{path}: not an mpinn checkpoint (no format={FORMAT} attribute)")
        g = f["model"]
        arch = Architecture(tuple(int(s) for s in g.attrs["sizes"]), str(g.attrs["activation"]),
                            str(g.attrs["loss"]), str(g.attrs["dtype"]))
        weights = []
        for i in range(len(arch.sizes) - 1):
            weights += [g[f"W{i}"][...], g[f"b{i}"][...]]
        o = f["optimizer"]
        a = f.attrs
        return Checkpoint(
            arch=arch, weights=weights, task=str(a["task"]), epoch=int(a["epoch"]),
            step=int(a["step"]), step_in_epoch=int(a["step_in_epoch"]), config=str(a["config"]),
            optimizer=str(o.attrs["optimizer"]), optimizer_state={k: o[k][...] for k in o},
            epoch_sums=f["progress/epoch_sums"][...],
            data_shape=(int(a["data_rows"]), int(a["data_features"]), int(a["data_outputs"])),
            version=str(a["mpinn_version"]), ranks=int(a.get("ranks", 1)))
