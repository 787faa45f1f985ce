"""The training configuration: a typed dataclass filled from TOML, then flags.

Precedence: defaults < the `--config` TOML file < command-line flags. Keys are
the field names below (a TOML file may also spell them with dashes). An unknown
key or a bad value is a UsageError that names the key. The resolved
configuration (with the data path made absolute) is written to
RUN_DIR/config.toml and can be fed back with `--config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

from mpinn.base.errors import UsageError
from mpinn.data.readers import IO_MODES
from mpinn.data.sampler import SHUFFLES
from mpinn.nn.functional import ACTIVATIONS, LOSSES
from mpinn.nn.model import DTYPES
from mpinn.nn.optim import OPTIMIZERS

RUN_ACTIONS = ("overwrite", "resume")  # what to do with RUN_DIR: not saved in config.toml
MAX_INT = 2**53  # integer settings: exact as floats, far from every C integer's limit
MAX_WIDTH = 2**31 - 1  # a layer width (a wider layer does not fit in memory anyway)
LR_SCHEDULES = ("constant", "step", "cosine")
LR_SCALINGS = ("none", "linear")
PROGRESS_MODES = ("auto", "bar", "lines", "off")


@dataclass
class TrainConfig:
    data: str = ""
    out: str = ""
    hidden: tuple[int, ...] = (256, 128)
    activation: str = "relu"
    loss: str = "cross-entropy"
    optimizer: str = "momentum"
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 128
    epochs: int = 10
    seed: int = 0
    dtype: str = "float32"
    weight_decay: float = 0.0
    shuffle: str = "global"
    block_rows: int = 1024
    window_rows: int = 65536
    io: str = "auto"
    prefetch: bool = True
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    stall_timeout: float = 600.0
    # regularisation (#9)
    dropout: tuple[float, ...] = ()  # per hidden layer; one value for all; () none
    l1: float = 0.0
    clip_norm: float = 0.0  # 0: no clipping
    # learning rate (#9)
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    lr_step_every: int = 0
    lr_gamma: float = 0.1
    lr_min: float = 0.0
    lr_scaling: str = "none"
    base_batch: int = 0
    accumulate: int = 1
    # validation (#9)
    val_fraction: float = 0.0
    early_stopping: int = 0  # patience in epochs; 0: off
    # reporting (#9)
    progress: str = "auto"
    log_every: float = 30.0
    overwrite: bool = False
    resume: bool = False

    def validate(self) -> None:
        """UsageError naming the first bad field."""
        choices = {"activation": ACTIVATIONS, "loss": LOSSES, "optimizer": OPTIMIZERS,
                   "dtype": DTYPES, "shuffle": SHUFFLES, "io": IO_MODES,
                   "lr_schedule": LR_SCHEDULES, "lr_scaling": LR_SCALINGS,
                   "progress": PROGRESS_MODES}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise UsageError(f"{key}: {getattr(self, key)!r} is not one of "
                                 f"{', '.join(allowed)}")
        positive = {"lr": self.lr, "batch_size": self.batch_size,
                    "block_rows": self.block_rows, "window_rows": self.window_rows}
        for key, value in positive.items():
            if not value > 0:
                raise UsageError(f"{key} must be positive, got {value}")
        if self.keep_checkpoints < 1:
            raise UsageError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        for key in ("epochs", "weight_decay", "momentum", "seed", "checkpoint_every",
                    "stall_timeout", "l1", "clip_norm", "warmup_steps", "lr_step_every",
                    "lr_min", "base_batch", "val_fraction", "early_stopping"):
            if not getattr(self, key) >= 0:
                raise UsageError(f"{key} must be >= 0, got {getattr(self, key)}")
        self.validate_toolkit()
        if self.momentum >= 1:
            raise UsageError(f"momentum must be < 1, got {self.momentum}")
        for f in fields(self):  # before any of them reaches a C integer or an allocation
            value = getattr(self, f.name)
            if type(value) is int and value > MAX_INT:
                raise UsageError(f"{f.name} is too large: {value} (at most {MAX_INT})")
        if 0 < self.stall_timeout < 1:
            raise UsageError(f"stall_timeout must be 0 (no limit) or at least 1 second, got "
                             f"{self.stall_timeout:g}")
        if not self.data:
            raise UsageError("data: no dataset file given")
        if not self.out:
            raise UsageError("out: no run directory given (--out RUN_DIR)")
        if self.resume and self.overwrite:
            raise UsageError("--resume continues the run in --out, --overwrite replaces it: "
                             "give one of them")


    def validate_toolkit(self) -> None:
        """The regularisation, schedule, accumulation and validation settings."""
        if len(self.dropout) not in (0, 1, len(self.hidden)):
            raise UsageError(f"dropout: give one drop probability for every hidden layer, or "
                             f"{len(self.hidden)} (one per hidden layer), got "
                             f"{len(self.dropout)}")
        if self.dropout and not self.hidden:
            raise UsageError("dropout: a linear model (no hidden layers) has nothing to drop")
        if not self.lr_gamma > 0 or not self.log_every > 0:
            raise UsageError(f"lr_gamma and log_every must be positive, got {self.lr_gamma} "
                             f"and {self.log_every}")
        if self.lr_schedule == "cosine" and self.lr_min > self.lr:
            raise UsageError(f"lr_min ({self.lr_min:g}) must not exceed lr ({self.lr:g}): "
                             f"cosine decays from lr to lr_min")
        if self.lr_schedule == "step" and not self.lr_step_every:
            raise UsageError("lr_schedule step: give lr_step_every N (decay every N steps)")
        if self.lr_scaling == "linear" and not self.base_batch:
            raise UsageError("lr_scaling linear: give base_batch N (lr x batch_size / N)")
        if not 1 <= self.accumulate <= self.batch_size:
            raise UsageError(f"accumulate must lie in [1, batch_size = {self.batch_size}], "
                             f"got {self.accumulate}")
        if not self.val_fraction < 1:
            raise UsageError(f"val_fraction must be < 1, got {self.val_fraction}")
        if self.early_stopping and not self.val_fraction:
            raise UsageError("early_stopping watches the validation loss: give val_fraction")
        if self.val_fraction and self.shuffle == "block":
            # its windows read whole blocks of the file, held-out rows among them
            raise UsageError("val_fraction cannot be used with shuffle block (its contiguous "
                             "reads would include the held-out rows); use shuffle global or "
                             "none, or hold out a test split in the file instead")


def parse_hidden(value: Any) -> tuple[int, ...]:
    """'256,128' or [256, 128] -> (256, 128); '' or [] -> () (a linear model)."""
    items = value.split(",") if isinstance(value, str) else value
    if isinstance(value, str) and not value.strip():
        return ()
    try:
        sizes = tuple(int(str(s).strip()) for s in items)
    except (TypeError, ValueError):
        raise UsageError(f"hidden: expected comma-separated layer widths like 256,128, "
                         f"got {value!r}") from None
    if any(s < 1 for s in sizes):
        raise UsageError(f"hidden: layer widths must be >= 1, got {value!r}")
    if any(s > MAX_WIDTH for s in sizes):
        raise UsageError(f"hidden: layer widths must be at most {MAX_WIDTH}, got {value!r}")
    return sizes


def parse_dropout(value: Any) -> tuple[float, ...]:
    """'0.2' or '0.5,0.2' or 0.2 or [0.5, 0.2] -> a tuple of drop probabilities in [0, 1)."""
    if isinstance(value, str):
        items = [] if not value.strip() else value.split(",")
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    try:
        rates = tuple(float(str(v).strip()) for v in items
                      if not isinstance(v, bool))
    except (TypeError, ValueError):
        raise UsageError(f"dropout: expected drop probabilities like 0.2 or 0.5,0.2, got "
                         f"{value!r}") from None
    if len(rates) != len(items) or any(not 0 <= r < 1 for r in rates):
        raise UsageError(f"dropout: drop probabilities must lie in [0, 1), got {value!r}")
    return rates


def _coerce(key: str, value: Any, kind: type) -> Any:
    if key == "hidden":
        return parse_hidden(value)
    if key == "dropout":
        return parse_dropout(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UsageError(f"{key}: expected true or false, got {value!r}")
    if kind in (int, float) and isinstance(value, bool):  # TOML true is no number
        raise UsageError(f"{key}: expected a number, got {value!r}")
    if kind is int and isinstance(value, float):
        raise UsageError(f"{key}: expected an integer, got {value!r}")
    try:
        converted = kind(value)
    except (TypeError, ValueError):
        raise UsageError(f"{key}: expected {kind.__name__}, got {value!r}") from None
    if kind is float and not math.isfinite(converted):  # TOML inf and nan, or --lr inf
        raise UsageError(f"{key}: expected a finite number, got {value!r}")
    return converted


def closest(word: str, known: Iterable[str]) -> str | None:
    """The known name a mistyped word most likely meant, or None.

    Spelling first (difflib: hiden -> hidden, trian -> train), then initials, as
    other programs name options (learning_rate or --learning-rate -> lr). Dashes
    and underscores count alike, so flags and configuration keys share this.
    """
    def bare(name: str) -> str:
        return name.lstrip("-").replace("-", "_")
    by_bare = {bare(k): k for k in known}
    spelt = difflib.get_close_matches(bare(word), by_bare, n=1)
    if spelt:
        return by_bare[spelt[0]]
    words = bare(word).split("_")
    return by_bare.get("".join(w[:1] for w in words)) if len(words) > 1 else None


def load_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config {path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise UsageError(f"--config {path}: cannot read it ({exc.strerror})") from None


def resolve(toml: dict[str, Any], flags: dict[str, Any]) -> TrainConfig:
    """TrainConfig from a TOML mapping and flags (None means 'not given'), validated."""
    types = {f.name: (int if f.name == "hidden" else float if f.name == "dropout"
                      else type(f.default)) for f in fields(TrainConfig)}
    values: dict[str, Any] = {}
    for source in (toml, flags):
        for raw_key, value in source.items():
            key = raw_key.replace("-", "_")
            if key not in types:
                close = closest(key, types)
                hint = f" (did you mean {close}?)" if close else ""
                raise UsageError(f"unknown configuration key {raw_key!r}{hint}; known keys: "
                                 f"{', '.join(types)}")
            if value is not None:
                values[key] = _coerce(key, value, types[key])
    cfg = TrainConfig(**values)
    cfg.validate()
    # stored absolute, so that --resume (which reads config.toml) works from anywhere
    cfg.data = os.path.abspath(cfg.data)
    return cfg


def to_toml(cfg: TrainConfig) -> str:
    """The configuration as TOML (every value is a string, number, bool or int list)."""
    lines = ["# mpinn resolved training configuration"]
    for key, value in dataclasses.asdict(cfg).items():
        if key in RUN_ACTIONS:
            continue
        if isinstance(value, (tuple, list)):
            value = list(value)
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"
