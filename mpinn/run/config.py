"""The training configuration: every setting defined once, as a field of TrainConfig.

A field's `setting(...)` holds all that mpinn says of it: its default and type (the
field's), its flag, help text and metavar on the command line, the values it allows and
its bounds, whether `mpinn scaling run` passes it on, whether a resumed run must keep it,
and whether scaling reports compare it. The command line of `mpinn train` and `mpinn
scaling run`, the TOML keys (the field names; a file may spell them with dashes), the
`--help` defaults, the trajectory a resume keeps and the validation all derive from
these fields (run/resolve.py reads TOML and flags into one).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from mpinn.base.errors import UsageError
from mpinn.comm.gradsync import SYNC_MODES
from mpinn.comm.wire import WIRE_DTYPES
from mpinn.data.readers import IO_MODES
from mpinn.data.sampler import SHUFFLES
from mpinn.nn.functional import ACTIVATIONS, LOSSES
from mpinn.nn.model import DTYPES
from mpinn.nn.optim import OPTIMIZERS
from mpinn.nn.schedule import LR_SCALINGS, LR_SCHEDULES

MAX_INT = 2**53  # integer settings: exact as floats, far from every C integer's limit
PROGRESS_MODES = ("auto", "bar", "lines", "off")


@dataclass(frozen=True)
class Setting:
    """What mpinn says of one field of TrainConfig (see the module docstring)."""

    help: str  # {default} and {choices} are filled in (see describe)
    metavar: str | None = None
    choices: tuple[str, ...] = ()  # the values it may take (validate names the key)
    listed: bool = False  # argparse itself refuses other values (naming the closest)
    minimum: float | None = None  # validate: value >= minimum ...
    positive: bool = False  # ... or value > 0
    group: str | None = None  # its argument group in `mpinn train --help`
    sweep: bool = True  # an option of `mpinn scaling run` too (not the run's own directory)
    sweep_help: str | None = None  # its help there, if another ({sweep_default} filled in)
    sweep_default: Any = None  # a sweep's default, if not the training's
    trajectory: bool = False  # a resumed run must keep it (a change is refused)
    compared: bool = False  # sweeps that differ in it are not reported together
    saved: bool = True  # written to config.toml (not: what to do with the run directory)
    positional: bool = False  # an argument, not an option
    const: Any = None  # a flag without a value that sets this (--no-prefetch: False)
    flag: str | None = None  # the flag, if not --the-name-with-dashes
    alias: tuple[str, Any, str] | None = None  # another flag setting a value: flag, value, help


def setting(default: Any, help: str, **meta: Any) -> Any:
    """A field of TrainConfig with its Setting."""
    return dataclasses.field(default=default, metadata={"setting": Setting(help, **meta)})


@dataclass
class TrainConfig:
    data: str = setting("", "dataset HDF5 file (or `data` in --config)", positional=True)
    out: str = setting("", "run directory (config.toml, metrics.jsonl, summary.json, "
                       "checkpoint.h5); one run at a time may use it (a second is refused)",
                       sweep=False)
    hidden: tuple[int, ...] = setting((256, 128), "hidden layer widths, comma separated "
                                      "(default {default})", trajectory=True, compared=True)
    activation: str = setting("relu", "{choices} (default {default})", choices=ACTIVATIONS,
                              trajectory=True, compared=True)
    loss: str = setting("cross-entropy", "{choices} (default {default})", choices=LOSSES,
                        trajectory=True, compared=True)
    optimizer: str = setting("momentum", "{choices} (default {default})", choices=OPTIMIZERS,
                             trajectory=True, compared=True)
    lr: float = setting(0.01, "learning rate (default {default})", positive=True,
                        compared=True)
    momentum: float = setting(0.9, "momentum coefficient (default {default})", minimum=0,
                              compared=True)
    batch_size: int = setting(
        128, "GLOBAL batch size, split over the ranks (default {default})", positive=True,
        sweep_help="strong scaling: the GLOBAL batch of every point; weak: the batch PER RANK "
        "(the global batch is ranks x this) (default {default})", trajectory=True,
        compared=True)
    epochs: int = setting(10, "epochs; 0 writes the initial checkpoint (default {default})",
                          minimum=0, sweep_help="epochs per point (default {sweep_default})",
                          sweep_default=1, compared=True)
    seed: int = setting(0, "seed of weights and sample order (default {default})", minimum=0,
                        trajectory=True)
    dtype: str = setting("float32", "{choices} (default {default})", choices=DTYPES,
                         trajectory=True, compared=True)
    reproducible: bool = setting(
        False, "the same bits on any number of ranks: weights, optimizer state and losses "
        "identical for P = 1, 2, 3, ... (on machines with the same BLAS kernels). Every "
        "product that sums over rows, inputs or ranks runs on integer grids in float64, "
        "exactly (about 20 bits per value relative to each tensor's maximum: "
        "docs/reproducible.md); a float32 model then computes its products in float64. "
        "Not with a half-precision --sync-dtype or --shuffle block", const=True,
        trajectory=True, compared=True, alias=("--no-reproducible", False, "floating-point "
                                               "products (the default)"))
    weight_decay: float = setting(0.0, "L2 weight decay (default {default})", minimum=0,
                                  compared=True)
    shuffle: str = setting(
        "global", "{default}: a new permutation of all rows every epoch (default); block: "
        "permuted blocks of consecutive rows, shuffled within a window in memory (large "
        "sequential reads, for files larger than memory; results depend on the rank count); "
        "feistel: as global, the permutation computed (a keyed Feistel network) instead of "
        "stored, so memory does not grow with the rows (a different order from global's); "
        "none: file order", choices=SHUFFLES, listed=True, trajectory=True, compared=True,
        alias=("--no-shuffle", "none", "the same as --shuffle none: batch k is rows k*B .. "
               "k*B+B-1"))
    block_rows: int = setting(1024, "rows per block with --shuffle block (default {default})",
                              positive=True, trajectory=True, compared=True)
    window_rows: int = setting(65536, "rows (over all ranks) shuffled together in memory with "
                               "--shuffle block (default {default})", positive=True,
                               trajectory=True, compared=True)
    io: str = setting("auto", "mpio: collective MPI-IO reads (needs parallel h5py); "
                      "independent: every rank reads with the serial driver; {default} "
                      "(default): mpio if available", choices=IO_MODES, listed=True,
                      compared=True)
    prefetch: bool = setting(True, "read each batch when needed instead of during the "
                             "previous step", flag="--no-prefetch", const=False, compared=True)
    overwrite: bool = setting(False, "replace a run already in --out", const=True, sweep=False,
                              saved=False)
    resume: bool = setting(False, "continue the run in --out from its checkpoint.h5, with its "
                           "config.toml (flags may extend --epochs; changing the model, data, "
                           "batch size, seed or sampling is refused). Any number of ranks.",
                           const=True, sweep=False, saved=False)
    checkpoint_every: int = setting(0, "also checkpoint every N steps (default {default}: at "
                                    "the end of each epoch only)", metavar="N", minimum=0)
    keep_checkpoints: int = setting(2, "keep the last K checkpoints in RUN_DIR/checkpoints "
                                    "(default {default})", metavar="K", minimum=1)
    sync: str = setting(
        "overlap", "{choices}: start each bucket's gradient Allreduce as soon as backward "
        "has produced it, or all at once after backward (default {default}; the same "
        "sums: overlap reorders them only across buckets, for P > 2)", choices=SYNC_MODES,
        group="performance")
    sync_dtype: str = setting(
        "model", "the gradients on the wire: {choices}; model (default): the model's "
        "dtype, a sum that does not depend on P. float16 or bfloat16 send half the bytes: "
        "each rank rounds its gradient once, each chunk's owner sums in float32 and rounds "
        "once, and what the roundings lose is sent in later steps (error feedback). The sum "
        "then depends on P (relative error per step about 4e-4 float16, 3e-3 bfloat16). Worth it "
        "over networks, not on shared memory, where the casts cost more than they save",
        choices=("model", *WIRE_DTYPES), group="performance", trajectory=True, compared=True)
    shard_optimizer: bool = setting(
        False, "ZeRO stage 1: each rank keeps the optimizer state of 1/P of the parameters "
        "and updates only them; the gradients are reduce-scattered onto their owners and "
        "the updated parameters all-gathered (the same bytes as the Allreduce; the update "
        "and the optimizer's memory are 1/P). The same weights as without it (float64: "
        "within 1e-12); checkpoints keep the full state", const=True, group="performance",
        compared=True, alias=("--no-shard-optimizer", False, "every rank updates all the "
                              "parameters (the default; turns a resumed run's sharding off)"))
    bucket_mb: float = setting(
        0.25, "overlap: the least MB of gradients sent in one Allreduce (default {default})",
        metavar="MB", positive=True, group="performance")
    trace: str = setting(
        "", "write a timeline of the run to FILE (Chrome trace-event JSON; open it in "
        "Perfetto): every rank's step phases, each bucket's Allreduce, the read-ahead, "
        "checkpoints", metavar="FILE", group="performance", sweep=False, saved=False)
    trace_steps: int = setting(50, "--trace keeps the first and the last N steps (default "
                               "{default})", metavar="N", minimum=1, group="performance")
    stall_timeout: float = setting(
        600.0, "a rank that waits this long in a collective asks every rank whether it is "
        "alive, reports the ranks that do not answer, and ends the job (exit 1); 0 waits "
        "forever (default {default})", metavar="SECONDS", minimum=0)
    dropout: tuple[float, ...] = setting(
        (), "inverted dropout after every hidden layer: one drop probability for all, or one "
        "per hidden layer (default {default}; off in evaluation)", metavar="P[,P...]",
        group="regularisation", trajectory=True, compared=True)
    l1: float = setting(0.0, "L1 penalty (default {default})", metavar="F", minimum=0,
                        group="regularisation", compared=True)
    clip_norm: float = setting(0.0, "clip the summed gradient to this global L2 norm (default "
                               "{default}: off)", metavar="F", minimum=0,
                               group="regularisation", compared=True)
    lr_schedule: str = setting("constant", "{choices} (default {default})",
                               choices=LR_SCHEDULES, group="learning rate", compared=True)
    warmup_steps: int = setting(0, "rise linearly from 0 to the rate over the first N steps "
                                "(default {default})", metavar="N", minimum=0,
                                group="learning rate", compared=True)
    lr_step_every: int = setting(0, "with --lr-schedule step: multiply the rate by --lr-gamma "
                                 "every N steps", metavar="N", minimum=0,
                                 group="learning rate")
    lr_gamma: float = setting(0.1, "step decay factor (default {default})", metavar="F",
                              positive=True, group="learning rate")
    lr_min: float = setting(0.0, "with --lr-schedule cosine: the rate at the last step "
                            "(default {default})", metavar="F", minimum=0,
                            group="learning rate")
    lr_scaling: str = setting("none", "{choices}: lr x batch-size / --base-batch (default "
                              "{default})", choices=LR_SCALINGS, group="learning rate",
                              compared=True)
    base_batch: int = setting(0, "the batch size --lr was tuned for, with --lr-scaling linear",
                              metavar="N", minimum=0, group="learning rate", compared=True)
    accumulate: int = setting(1, "sum K micro-batches of batch-size/K per update, for batches "
                              "that do not fit in memory (default {default})", metavar="K",
                              group="learning rate", compared=True)
    val_fraction: float = setting(
        0.0, "hold out this fraction of the training split (chosen by the seed), report it "
        "every epoch and keep the best model as RUN_DIR/best.h5 (default {default})",
        metavar="F", minimum=0, group="validation and reporting", trajectory=True,
        compared=True)
    early_stopping: int = setting(0, "stop after PATIENCE epochs without a lower validation "
                                  "loss (needs --val-fraction; default {default}: off)",
                                  metavar="PATIENCE", minimum=0,
                                  group="validation and reporting")
    progress: str = setting("auto", "{choices}: progress within an epoch (auto: a live bar at "
                            "a terminal, else lines; default {default})",
                            choices=PROGRESS_MODES, group="validation and reporting")
    log_every: float = setting(30.0, "seconds between progress lines (default {default})",
                               metavar="SECONDS", positive=True,
                               group="validation and reporting")

    def validate(self) -> None:
        """UsageError naming the first bad field by its flag and its key (named())."""
        for f, s in settings():
            value = getattr(self, f.name)
            if s.choices and value not in s.choices:
                close = closest(str(value), s.choices)
                raise UsageError(f"{named(f.name)}: {value!r} is not one of "
                                 f"{', '.join(s.choices)}"
                                 + (f" (did you mean {close}?)" if close else ""))
            if s.positive and not value > 0:
                raise UsageError(f"{named(f.name)} must be positive, got {value}")
            if s.minimum is not None and not value >= s.minimum:
                raise UsageError(f"{named(f.name)} must be >= {s.minimum:g}, got {value}")
            if type(value) is int and value > MAX_INT:  # before it reaches a C integer
                raise UsageError(f"{named(f.name)} is too large: {value} (at most {MAX_INT})")
        self.validate_combinations()
        if not self.data:
            raise UsageError("data: no dataset file given (mpinn train DATA.h5, or data in "
                             "--config)")
        if not self.out:
            raise UsageError(f"{named('out')}: no run directory given (--out RUN_DIR)")
        if self.resume and self.overwrite:
            raise UsageError("--resume continues the run in --out, --overwrite replaces it: "
                             "give one of them")

    def validate_combinations(self) -> None:
        """The settings that bound each other."""
        if self.momentum >= 1:
            raise UsageError(f"{named('momentum')} must be < 1, got {self.momentum}")
        if 0 < self.stall_timeout < 1:
            raise UsageError(f"{named('stall_timeout')} must be 0 (no limit) or at least 1 "
                             f"second, got {self.stall_timeout:g}")
        if len(self.dropout) not in (0, 1, len(self.hidden)):
            raise UsageError(f"{named('dropout')}: give one drop probability for every hidden "
                             f"layer, or {len(self.hidden)} (one per hidden layer), got "
                             f"{len(self.dropout)}")
        if self.dropout and not self.hidden:
            raise UsageError(f"{named('dropout')}: a linear model (no hidden layers) has "
                             f"nothing to drop")
        if self.lr_schedule == "cosine" and self.lr_min > self.lr:
            raise UsageError(f"{named('lr_min')} must not exceed {named('lr')}: cosine decays "
                             f"from lr to lr_min, got {self.lr_min:g} > {self.lr:g}")
        if self.lr_schedule == "step" and not self.lr_step_every:
            raise UsageError(f"{named('lr_schedule')} step needs {named('lr_step_every')} "
                             f"N: decay every N steps")
        if self.lr_scaling == "linear" and not self.base_batch:
            raise UsageError(f"{named('lr_scaling')} linear needs {named('base_batch')} N: "
                             f"lr x batch_size / N")
        if not 1 <= self.accumulate <= self.batch_size:
            raise UsageError(f"{named('accumulate')} must lie in [1, batch_size = "
                             f"{self.batch_size}], got {self.accumulate}")
        if not self.val_fraction < 1:
            raise UsageError(f"{named('val_fraction')} must be < 1, got {self.val_fraction}")
        if self.early_stopping and not self.val_fraction:
            raise UsageError(f"{named('early_stopping')} watches the validation loss: give "
                             f"{named('val_fraction')}")
        if self.reproducible and (self.sync_dtype != "model" or self.shuffle == "block"):
            what = (f"{named('sync_dtype')} {self.sync_dtype} rounds each rank's gradient "
                    f"before the sum" if self.sync_dtype != "model" else
                    f"{named('shuffle')} block gives each rank windows of its own, which "
                    f"depend on P")
            raise UsageError(f"{named('reproducible')}: {what}; use "
                             + ("--sync-dtype model" if self.sync_dtype != "model"
                                else "--shuffle global or feistel"))
        if self.val_fraction and self.shuffle == "block":
            # its windows read whole blocks of the file, held-out rows among them
            raise UsageError(f"{named('val_fraction')} cannot be used with {named('shuffle')} "
                             f"block (its contiguous reads would include the held-out rows); "
                             f"use shuffle global or none, or hold out a test split in the "
                             f"file instead")


def settings() -> list[tuple[dataclasses.Field, Setting]]:
    """Every field of TrainConfig with its Setting, in declaration order."""
    return [(f, f.metadata["setting"]) for f in fields(TrainConfig)]


def flag(name: str) -> str | None:
    """The command-line flag of a setting (--batch-size); None for the positional data."""
    s: Setting = next(f.metadata["setting"] for f in fields(TrainConfig) if f.name == name)
    return None if s.positional else s.flag or "--" + name.replace("_", "-")


def named(name: str) -> str:
    """A setting as errors name it, its flag and its key: `--batch-size (batch_size)`, so
    that a message fits both where it came from, the command line and a --config file."""
    option = flag(name)
    return name if option is None else f"{option} ({name})"


def closest(word: str, known: Iterable[str]) -> str | None:
    """The known name a mistyped word most likely meant, or None.

    First the one name the word begins (--ep -> --epochs, as argparse's abbreviations
    would have taken it), then spelling (difflib: hiden -> hidden, trian -> train),
    then initials, as other programs name options (learning_rate or --learning-rate ->
    lr). Dashes and underscores count alike, so flags and configuration keys share this.
    """
    def bare(name: str) -> str:
        return name.lstrip("-").replace("-", "_")
    by_bare = {bare(k): k for k in known}
    word = bare(word)
    begun = [k for k in by_bare if word and k.startswith(word)]
    if len(begun) == 1:
        return by_bare[begun[0]]
    spelt = difflib.get_close_matches(word, by_bare, n=1)
    if spelt:
        return by_bare[spelt[0]]
    words = word.split("_")
    return by_bare.get("".join(w[:1] for w in words)) if len(words) > 1 else None


def keys(**wanted: bool) -> tuple[str, ...]:
    """The field names whose Setting has the given values, e.g. keys(trajectory=True)."""
    return tuple(f.name for f, s in settings()
                 if all(getattr(s, k) == v for k, v in wanted.items()))


def shown(value: Any) -> str:
    """A default as --help shows it: 256,128; 0.01; 600; none (an empty list)."""
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe(f: dataclasses.Field, sweep: bool = False) -> str:
    """The help text of a field, its default (and choices) filled in."""
    s: Setting = f.metadata["setting"]
    text = s.sweep_help if sweep and s.sweep_help else s.help
    return text.format(default=shown(f.default), sweep_default=shown(s.sweep_default),
                       choices=" | ".join(s.choices))


TRAJECTORY_KEYS = keys(trajectory=True)  # what a resumed run must keep
COMPARED_KEYS = keys(compared=True)  # what sweeps reported together must share
SWEEP_KEYS = keys(sweep=True)  # the options `mpinn scaling run` passes to every point
SAVED_KEYS = keys(saved=True)  # config.toml's keys
