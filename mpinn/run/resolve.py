"""A training configuration resolved: defaults < the `--config` TOML file < flags.

Keys are TrainConfig's field names (config.py); a TOML file may also spell them with
dashes. An unknown key is a UsageError that names the closest known one; a bad value
one that names the setting's flag and key (config.named: `--lr (lr)`), wherever the
value came from. The resolved configuration, with the data path made absolute, is
written to RUN_DIR/config.toml and can be fed back with `--config`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import fields
from typing import Any

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

from mpinn.base.errors import UsageError
from mpinn.run.config import SAVED_KEYS, TrainConfig, closest, named

MAX_WIDTH = 2**31 - 1  # a layer width (a wider layer does not fit in memory anyway)


def parse_hidden(value: Any) -> tuple[int, ...]:
    """'256,128' or [256, 128] -> (256, 128); '' or [] -> () (a linear model)."""
    items = value.split(",") if isinstance(value, str) else value
    if isinstance(value, str) and not value.strip():
        return ()
    try:
        sizes = tuple(int(str(s).strip()) for s in items)
    except (TypeError, ValueError):
        raise UsageError(f"{named('hidden')}: expected comma-separated layer widths like "
                         f"256,128, got {value!r}") from None
    if any(s < 1 for s in sizes):
        raise UsageError(f"{named('hidden')}: layer widths must be >= 1, got {value!r}")
    if any(s > MAX_WIDTH for s in sizes):
        raise UsageError(f"{named('hidden')}: layer widths must be at most {MAX_WIDTH}, "
                         f"got {value!r}")
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
        raise UsageError(f"{named('dropout')}: expected drop probabilities like 0.2 or "
                         f"0.5,0.2, got {value!r}") from None
    if len(rates) != len(items) or any(not 0 <= r < 1 for r in rates):
        raise UsageError(f"{named('dropout')}: drop probabilities must lie in [0, 1), "
                         f"got {value!r}")
    return rates


def _coerce(key: str, value: Any, kind: type) -> Any:
    if key == "hidden":
        return parse_hidden(value)
    if key == "dropout":
        return parse_dropout(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UsageError(f"{named(key)}: expected true or false, got {value!r}")
    if kind in (int, float) and isinstance(value, bool):  # TOML true is no number
        raise UsageError(f"{named(key)}: expected a number, got {value!r}")
    if kind is int and isinstance(value, float):
        raise UsageError(f"{named(key)}: expected an integer, got {value!r}")
    try:
        converted = kind(value)
    except (TypeError, ValueError):
        raise UsageError(f"{named(key)}: expected {kind.__name__}, got {value!r}") from None
    if kind is float and not math.isfinite(converted):  # TOML inf and nan, or --lr inf
        raise UsageError(f"{named(key)}: expected a finite number, got {value!r}")
    return converted


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
        if key not in SAVED_KEYS:
            continue
        if isinstance(value, (tuple, list)):
            value = list(value)
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"
