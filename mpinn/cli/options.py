"""The options of `mpinn train` and `mpinn scaling run`, derived from TrainConfig's fields
(run/config.py): flag, help with the real default, metavar, type, group. Every option
defaults to None, "not given", so that a flag overrides the --config file only when it
is typed."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from mpinn.run.config import Setting, describe, flag, settings

CONFIG_HELP = "TOML file with any of the options below (names with _)"
TYPES = {"int": int, "float": float}  # the fields' annotations that argparse converts


def add_train_options(parser: argparse.ArgumentParser, sweep: bool = False) -> None:
    """TrainConfig's options, in its order, --config after where the data and the run go;
    for a sweep without the run directory's (--out, --overwrite, --resume), which the
    sweep decides per point."""
    groups: dict[str, Any] = {}
    config = False  # --config comes before the first setting it may hold
    for f, s in settings():
        if sweep and not s.sweep:
            continue
        if s.sweep and not s.positional and not config:
            parser.add_argument("--config", help=CONFIG_HELP)
            config = True
        where = parser if s.group is None else groups.setdefault(
            s.group, parser.add_argument_group(s.group))
        where.add_argument(*flags(f, s), **argument(f, s, sweep))
        if s.alias is not None:
            flag, value, text = s.alias
            where.add_argument(flag, dest=f.name, action="store_const", const=value, help=text)


def flags(f: dataclasses.Field, s: Setting) -> tuple[str, ...]:
    return (flag(f.name) or f.name,)  # the positional data: its name


def argument(f: dataclasses.Field, s: Setting, sweep: bool) -> dict[str, Any]:
    """add_argument's keywords for a field."""
    found: dict[str, Any] = {"help": describe(f, sweep)}
    if s.positional:
        return found | {"nargs": "?"}
    found["dest"] = f.name
    if s.const is not None:
        return found | {"action": "store_const", "const": s.const}
    if f.type in TYPES:
        found["type"] = TYPES[f.type]
    if s.listed:
        found["choices"] = s.choices
    if s.metavar:
        found["metavar"] = s.metavar
    return found
