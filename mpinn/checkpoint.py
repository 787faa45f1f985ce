"""Checkpoints: one HDF5 file, readable with plain h5py, written atomically.

Layout:
    /model/W{i} (fan_in x fan_out), /model/b{i}   layer i, i = 0 .. L-1
    /model attrs: sizes, activation, loss, dtype
    /optimizer/<name>                              optimizer state arrays (attr: optimizer)
    / attrs: format, mpinn_version, epoch (completed), step (global), task,
             config (the resolved TOML)

The file is written to a temporary name, fsynced and renamed (fileio.py), so a
crash leaves the previous checkpoint or the new one, never a partial file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h5py
import numpy as np

from . import __version__
from .errors import UsageError
from .fileio import atomic_output
from .model import MLP, Architecture

FORMAT = "mpinn-checkpoint-1"


@dataclass
class Checkpoint:
    arch: Architecture
    weights: list[np.ndarray]  # W0, b0, W1, b1, ...
    task: str
    epoch: int = 0
    step: int = 0
    config: str = ""
    optimizer: str = ""
    optimizer_state: dict[str, np.ndarray] = field(default_factory=dict)

    def restore(self, model: MLP) -> None:
        """Copy the weights into a model of the same architecture."""
        assert model.arch == self.arch, (model.arch, self.arch)
        views = [v for pair in zip(model.W, model.b) for v in pair]
        for view, value in zip(views, self.weights):
            view[...] = value


def save(path: str, model: MLP, task: str, epoch: int, step: int, config: str,
         optimizer: str, optimizer_state: dict[str, np.ndarray]) -> None:
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update(format=FORMAT, mpinn_version=__version__, epoch=epoch, step=step,
                       task=task, config=config)
        g = f.create_group("model")
        g.attrs.update(sizes=np.array(model.arch.sizes, np.int64),
                       activation=model.arch.activation, loss=model.arch.loss,
                       dtype=model.arch.dtype)
        for i, (w, b) in enumerate(zip(model.W, model.b)):
            g.create_dataset(f"W{i}", data=w)
            g.create_dataset(f"b{i}", data=b)
        o = f.create_group("optimizer")
        o.attrs["optimizer"] = optimizer
        for name, value in optimizer_state.items():
            o.create_dataset(name, data=value)


def load(path: str) -> Checkpoint:
    """Read a checkpoint; UsageError if the file is missing or not a checkpoint."""
    try:
        f = h5py.File(path, "r")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such checkpoint file") from None
    except OSError as exc:
        raise UsageError(f"{path}: not a readable HDF5 file ({exc})") from None
    with f:
        if f.attrs.get("format") != FORMAT or "model" not in f:
            raise UsageError(f"{path}: not an mpinn checkpoint (no format={FORMAT} attribute)")
        g = f["model"]
        arch = Architecture(tuple(int(s) for s in g.attrs["sizes"]), str(g.attrs["activation"]),
                            str(g.attrs["loss"]), str(g.attrs["dtype"]))
        weights = []
        for i in range(len(arch.sizes) - 1):
            weights += [g[f"W{i}"][...], g[f"b{i}"][...]]
        o = f["optimizer"]
        return Checkpoint(arch, weights, str(f.attrs["task"]), int(f.attrs["epoch"]),
                          int(f.attrs["step"]), str(f.attrs["config"]),
                          str(o.attrs["optimizer"]), {k: o[k][...] for k in o})
