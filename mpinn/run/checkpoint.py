"""Checkpoints: one HDF5 file, readable with plain h5py, written atomically.

Layout:
    /model/W{i} (fan_in x fan_out), /model/b{i}   layer i, i = 0 .. L-1
    /model attrs: sizes, activation, loss, dtype
    /optimizer/<name>       optimizer state arrays (velocity; m, v, t), attr: optimizer;
                            with --sync-dtype float16|bfloat16 also sync_residual (the
                            sum of all ranks' residuals) and sync_scale (scale, halvings);
                            with --reproducible also grid_exponents (nn/exact.py's)
    /progress/epoch_sums    the epoch's running sums so far (loss, correct, rows; all ranks)
    /progress/epoch_confusion  the epoch's confusion counts so far (C*C; optional: absent
                            in older checkpoints, empty for regression)
    / attrs: format, mpinn_version, task, config (the resolved TOML),
             epoch (completed epochs), step (global steps done),
             step_in_epoch (steps done of epoch `epoch`; 0 at an epoch boundary),
             data_rows, data_features, data_outputs (the training data's shape),
             ranks (the number of ranks that wrote it),
             lr_anchor_step, lr_anchor_rate (a cosine schedule stretched by a resume;
             step -1: not stretched; nn/schedule.py),
             best_val_loss, best_epoch, stale_epochs (validation: the lowest loss so
             far, its epoch, epochs since; inf, 0, 0 in files written before them)

That is everything needed to continue exactly: the sampler's position is
(epoch, step_in_epoch) because every epoch's plan is a pure function of the
seed and the epoch; the initial weights' generator is never used again.

The file is built in memory (HDF5's core driver, `image`) and its bytes are
written by history.py with base/files.write_atomically: space reserved first, then
a temporary file, fsync, rename. A crash leaves the previous checkpoint or the new
one, never a partial file; a full disk is a clear error, not a crash inside HDF5's close;
and a model with a NaN or an infinity is refused, never written.

Every checkpoint proves itself: its first 512 bytes are an HDF5 userblock (which
HDF5 skips, so h5py reads the file as usual) holding a header

    mpinn-checkpoint-digest-1
    sha256 <hex digest of every byte after the userblock>
    length <how many bytes follow the userblock>

`load` reads the file once, checks the header, the length and the digest, and
only then lets HDF5 parse the bytes, from memory. A flipped bit, a truncated or
a mangled file is refused (CorruptCheckpoint, exit 2) before HDF5 sees it: HDF5
trusts metadata, and corrupt metadata can make it loop forever or crash. A file
without the header (written before digests, starting with HDF5's signature)
still loads, with a warning, after the structure probe (data/probe.py).
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field, replace

import h5py
import numpy as np

from mpinn import __version__
from mpinn.base.errors import CollectiveError, UsageError
from mpinn.base.files import read_bytes
from mpinn.base.hdf5 import hdf5_errors, open_hdf5_image
from mpinn.data import probe
from mpinn.nn.finite import all_finite
from mpinn.nn.model import MLP, Architecture
from mpinn.run.resolve import tomllib

FORMAT = "mpinn-checkpoint-1"
GRIDS = "grid_exponents"  # /optimizer's array of a --reproducible run's grids (exact.py)
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
DIGEST_MAGIC = b"mpinn-checkpoint-digest-1"
USERBLOCK = 512  # bytes before HDF5's superblock: the header, then zeros
# sha256 over blake2b: with the CPU's SHA instructions it hashes a 22 MB checkpoint
# in 13 ms here, blake2b in 32 ms.
DIGEST = "sha256"
_warned: set[str] = set()  # checkpoints without a digest this process warned about


class CorruptCheckpoint(UsageError):
    """A checkpoint whose bytes are not those written: refused before HDF5 reads it."""


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
    # the epoch's confusion counts so far (C x C flattened; empty for regression)
    epoch_confusion: np.ndarray = field(default_factory=lambda: np.zeros(0))
    data_shape: tuple[int, int, int] = (0, 0, 0)  # rows, features, outputs
    version: str = __version__
    ranks: int = 1  # that wrote it (block shuffle's windows depend on it)
    lr_anchor: tuple[int, float] | None = None  # a stretched cosine schedule (nn/schedule.py)
    # validation (early stopping's state): the lowest val loss so far, its epoch
    # (0: none yet), and the epochs since without a lower one
    best_val_loss: float = float("inf")
    best_epoch: int = 0
    stale_epochs: int = 0
    path: str = ""  # the file it was loaded from ("" if built, not loaded)

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
    weights, sealed with their digest. CollectiveError if any value is not finite (a
    diverged model is never saved)."""
    arrays = [model.params, *ckpt.optimizer_state.values()]
    if not all(all_finite(a) for a in arrays):
        raise CollectiveError(f"refusing to write a checkpoint with non-finite values at step "
                              f"{ckpt.step}; the newest good checkpoint stays as it is")
    # grow the in-memory file in one step, not HDF5's default 64 KiB at a time
    size = sum(a.nbytes for a in arrays) + (1 << 20)
    with h5py.File(f"checkpoint-{id(ckpt)}", "w", driver="core", backing_store=False,
                   block_size=size, userblock_size=USERBLOCK) as f:
        f.attrs.update(format=FORMAT, mpinn_version=ckpt.version, epoch=ckpt.epoch,
                       step=ckpt.step, step_in_epoch=ckpt.step_in_epoch, task=ckpt.task,
                       config=ckpt.config, data_rows=ckpt.data_shape[0],
                       data_features=ckpt.data_shape[1], data_outputs=ckpt.data_shape[2],
                       ranks=ckpt.ranks,
                       lr_anchor_step=ckpt.lr_anchor[0] if ckpt.lr_anchor else -1,
                       lr_anchor_rate=ckpt.lr_anchor[1] if ckpt.lr_anchor else 0.0,
                       best_val_loss=ckpt.best_val_loss, best_epoch=ckpt.best_epoch,
                       stale_epochs=ckpt.stale_epochs)
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
        f.create_dataset("progress/epoch_confusion", data=ckpt.epoch_confusion)
        f.flush()
        return seal(f.id.get_file_image())


def seal(hdf5: bytes) -> bytes:
    """The file: the header (in the userblock), then the HDF5 bytes it vouches for.

    HDF5's core driver leaves the userblock out of its image (the superblock
    records it); should another HDF5 version include it, it is cut off here.
    """
    body = memoryview(hdf5)
    if bytes(body[USERBLOCK:USERBLOCK + 8]) == HDF5_SIGNATURE:
        body = body[USERBLOCK:]
    assert bytes(body[:8]) == HDF5_SIGNATURE, "no HDF5 superblock in the checkpoint image"
    digest = hashlib.new(DIGEST, body).hexdigest()
    header = b"%s\n%s %s\nlength %d\n" % (DIGEST_MAGIC, DIGEST.encode(), digest.encode(),
                                           len(body))
    return header.ljust(USERBLOCK, b"\0") + body


def unseal(path: str, data: bytes) -> memoryview:
    """The HDF5 bytes of a sealed checkpoint file (after its userblock), once its header,
    length and digest are checked; CorruptCheckpoint naming what does not match."""
    def refuse(what: str) -> CorruptCheckpoint:
        return CorruptCheckpoint(f"{path} is corrupt ({what}); nothing of it was read")
    lines = bytes(data[:USERBLOCK]).split(b"\n")[:3]
    try:
        name, digest = lines[1].decode("ascii").split(" ")
        label, length = lines[2].decode("ascii").split(" ")
        expected = int(length) if label == "length" and length.isdigit() else -1
    except (IndexError, ValueError):
        raise refuse("its digest header is damaged") from None
    if lines[0] != DIGEST_MAGIC or name != DIGEST or expected < 0:
        raise refuse("its digest header is damaged")
    body = memoryview(data)[USERBLOCK:]
    if len(body) != expected:
        raise refuse(f"it holds {len(body)} bytes after its header, its header says "
                     f"{expected} (truncated or extended)")
    if hashlib.new(DIGEST, body).hexdigest() != digest:
        raise refuse(f"its {DIGEST} digest does not match its content")
    return body


def load(path: str) -> Checkpoint:
    """Read a checkpoint; UsageError if the file is missing, corrupt (CorruptCheckpoint) or
    not a checkpoint. The file is read once; HDF5 parses the bytes in memory."""
    data = read_bytes(path, "checkpoint")
    if data.startswith(DIGEST_MAGIC):
        unseal(path, data)
    elif data.startswith(HDF5_SIGNATURE):  # written before digests: nothing proves it
        warn_legacy(path)
        probe.check(path)
    else:
        raise CorruptCheckpoint(f"{path} is corrupt or not an mpinn checkpoint: it starts "
                                f"with neither an mpinn digest header nor HDF5's signature")
    with hdf5_errors(path, "the checkpoint"):
        with open_hdf5_image(data) as f:  # HDF5 skips the userblock
            return replace(parse(path, f), path=path)


def warn_legacy(path: str) -> None:
    """Once per file and process (rank 0 loads checkpoints: once per job)."""
    if path not in _warned:
        _warned.add(path)
        print(f"mpinn: warning: {path} has no digest (written before mpinn's checkpoints "
              f"carried one); it is read without proof that its bytes are those written",
              file=sys.stderr, flush=True)


def parse(path: str, f: h5py.File) -> Checkpoint:
    """The Checkpoint in an open file; UsageError if the file is not a valid one."""
    if f.attrs.get("format") != FORMAT or "model" not in f:
        raise UsageError(f"{path}: not an mpinn checkpoint (no format={FORMAT} attribute)")
    g, o, a = f["model"], f["optimizer"], f.attrs
    try:
        arch = Architecture(tuple(int(s) for s in g.attrs["sizes"]), str(g.attrs["activation"]),
                            str(g.attrs["loss"]), str(g.attrs["dtype"]))
    except ValueError as exc:
        raise UsageError(f"{path}: not a valid mpinn checkpoint ({exc})") from None
    shapes = {"progress/epoch_sums": (3,)}
    for i, (fan_in, fan_out) in enumerate(zip(arch.sizes[:-1], arch.sizes[1:])):
        shapes.update({f"model/W{i}": (fan_in, fan_out), f"model/b{i}": (fan_out,)})
    for name, shape in shapes.items():
        if not isinstance(f.get(name), h5py.Dataset) or f[name].shape != shape:
            raise UsageError(f"{path}: not a valid mpinn checkpoint (/{name} is missing or "
                             f"not of shape {shape} as the model's sizes {arch.sizes} say)")
    weights = [f[name][...] for name in list(shapes)[1:]]
    return Checkpoint(
        arch=arch, weights=weights, task=str(a["task"]), epoch=int(a["epoch"]),
        step=int(a["step"]), step_in_epoch=int(a["step_in_epoch"]), config=str(a["config"]),
        optimizer=str(o.attrs["optimizer"]), optimizer_state={k: o[k][...] for k in o},
        epoch_sums=f["progress/epoch_sums"][...],
        epoch_confusion=f["progress/epoch_confusion"][...].ravel()
        if isinstance(f.get("progress/epoch_confusion"), h5py.Dataset) else np.zeros(0),
        data_shape=(int(a["data_rows"]), int(a["data_features"]), int(a["data_outputs"])),
        version=str(a["mpinn_version"]), ranks=int(a.get("ranks", 1)),
        lr_anchor=(int(a["lr_anchor_step"]), float(a["lr_anchor_rate"]))
        if int(a.get("lr_anchor_step", -1)) >= 0 else None,
        best_val_loss=float(a.get("best_val_loss", float("inf"))),
        best_epoch=int(a.get("best_epoch", 0)), stale_epochs=int(a.get("stale_epochs", 0)))


def is_checkpoint(path: str) -> bool:
    """Whether the file starts as mpinn writes checkpoints (its digest header)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(DIGEST_MAGIC)) == DIGEST_MAGIC
    except OSError:
        return False


def describe(path: str) -> str:
    """What `mpinn data inspect` says of a checkpoint: the model, where the run stands,
    who wrote it, and whether it came from a --reproducible run."""
    ckpt = load(path)
    arch, cfg = ckpt.arch, tomllib.loads(ckpt.config)
    state = ", ".join(f"{k} {np.shape(v)}" for k, v in ckpt.optimizer_state.items()
                      if k != GRIDS)
    lines = [f"{path}: mpinn checkpoint of a {ckpt.task} model "
             f"{'-'.join(map(str, arch.sizes))} ({arch.activation}, {arch.loss}, "
             f"{arch.dtype}; {arch.n_params:,} parameters)",
             f"  epoch {ckpt.epoch}, global step {ckpt.step} ({ckpt.step_in_epoch} into the "
             f"next epoch); written by {ckpt.ranks} rank{'s' if ckpt.ranks > 1 else ''} "
             f"with mpinn {ckpt.version}",
             f"  optimizer {ckpt.optimizer}: {state or 'no state'}"]
    if cfg.get("reproducible", False):
        lines.append("  reproducible: yes (--reproducible: its weights and optimizer state "
                     "are those of this run on any number of ranks); grid exponents "
                     + " ".join(f"{e:g}" for e in ckpt.optimizer_state.get(GRIDS, [])))
    else:
        lines.append("  reproducible: no (weights depend on the number of ranks in their "
                     "last bits)")
    return "\n".join(lines)
