"""Every training setting is defined once (run/config.py): its flag, help and default on
the command line of `mpinn train` and `mpinn scaling run`, its TOML key and its roles
derive from the field. In-process, no MPI."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import re

import pytest

from mpinn.cli.commands import build_parser
from mpinn.run.config import SWEEP_KEYS, TRAJECTORY_KEYS, TrainConfig, describe, settings, shown
from mpinn.run.resolve import resolve, to_toml, tomllib

pytestmark = pytest.mark.fast  # in-process: the tier of `make test-fast`


def subparser(path: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def flat(text: str) -> str:
    """Text without white space (argparse wraps help lines, also at hyphens)."""
    return "".join(text.split())


@pytest.mark.parametrize("path, sweep", [(("train",), False), (("scaling", "run"), True)])
def test_every_setting_has_a_flag_and_help_showing_its_real_default(path, sweep):
    parser = subparser(path)
    by_dest: dict[str, list[argparse.Action]] = {}
    for action in parser._actions:
        by_dest.setdefault(action.dest, []).append(action)
    text = flat(parser.format_help())
    for f, s in settings():
        if sweep and not s.sweep:  # the sweep decides it per point (its --out is its own)
            assert all(a.help != describe(f) for a in by_dest.get(f.name, [])), f.name
            continue
        action = by_dest[f.name][0]
        assert action.help and action.default is None, f.name  # None: not given
        assert action.help == describe(f, sweep) and flat(action.help) in text, f.name
        assert "{" not in action.help, f.name
        template = s.sweep_help if sweep and s.sweep_help else s.help
        if "{default}" in template or "{sweep_default}" in template:
            real = shown(s.sweep_default if "{sweep_default}" in template else f.default)
            assert re.search(rf"{re.escape(real)}\b", action.help), (f.name, action.help)
        if not s.positional:
            assert action.option_strings[0] == (s.flag or "--" + f.name.replace("_", "-"))
    # and the parser holds no option of its own that is no setting (but --config, -h)
    own = {a.dest for a in parser._actions} - {f.name for f, _ in settings()}
    assert own == {"help", "config"} | ({"ranks", "mode", "repeats", "launcher",
                                         "oversubscribe", "calibrate"} if sweep else set())


def test_a_default_shown_in_help_follows_the_field():
    field = next(f for f, _ in settings() if f.name == "lr")
    moved = copy.copy(field)  # the same setting with another default
    moved.default = 0.25
    assert "(default 0.25)" in describe(moved) and "(default 0.01)" in describe(field)
    assert shown((256, 128)) == "256,128" and shown(()) == "none" and shown(600.0) == "600"


def test_the_derived_key_sets():
    names = [f.name for f, _ in settings()]
    assert names == [f.name for f in dataclasses.fields(TrainConfig)]
    assert set(TRAJECTORY_KEYS) == {"batch_size", "seed", "shuffle", "block_rows",
                                    "window_rows", "optimizer", "hidden", "activation",
                                    "loss", "dtype", "dropout", "val_fraction",
                                    "sync_dtype",  # (a half-precision sync's residuals)
                                    "reproducible"}
    # the run's own files (a sweep's points would share them)
    assert set(names) - set(SWEEP_KEYS) == {"out", "overwrite", "resume", "trace"}


def test_config_toml_holds_every_saved_setting_and_reads_back(tmp_path):
    cfg = resolve({}, {"data": str(tmp_path / "d.h5"), "out": "run", "hidden": "8,4",
                       "dropout": "0.1", "lr": 0.5})
    text = to_toml(cfg)
    saved = tomllib.loads(text)
    assert set(saved) == {f.name for f, s in settings() if s.saved}
    assert resolve(saved, {}) == cfg
    # a flag overrides the file; dashes spell a key too
    saved.pop("batch_size")
    again = resolve({"batch-size": 64, **saved}, {"lr": 0.125})
    assert (again.batch_size, again.lr) == (64, 0.125)


# -- errors name the flag and the key; abbreviations are refused -----------------------------

BASE = {"data": "d.h5", "out": "run"}
NAMED = [  # (settings, the message), the same whether from a --config file or from flags
    ({"batch_size": 0}, "--batch-size (batch_size) must be positive, got 0"),
    ({"epochs": -1}, "--epochs (epochs) must be >= 0, got -1"),
    ({"lr_schedule": "cosin"}, "--lr-schedule (lr_schedule): 'cosin' is not one of constant, "
     "step, cosine (did you mean cosine?)"),
    ({"optimizer": "adma"}, "--optimizer (optimizer): 'adma' is not one of sgd, momentum, adam "
     "(did you mean adam?)"),
    ({"shuffle": "globl"}, "--shuffle (shuffle): 'globl' is not one of global, block, none, "
     "feistel (did you mean global?)"),
    ({"activation": "swish"}, "--activation (activation): 'swish' is not one of relu, tanh, "
     "sigmoid"),
    ({"lr_schedule": "step"}, "--lr-schedule (lr_schedule) step needs --lr-step-every "
     "(lr_step_every) N"),
    ({"momentum": 1.0}, "--momentum (momentum) must be < 1, got 1.0"),
    ({"early_stopping": 2}, "--early-stopping (early_stopping) watches the validation loss: "
     "give --val-fraction (val_fraction)"),
    ({"hidden": "8,x"}, "--hidden (hidden): expected comma-separated layer widths"),
    ({"dropout": "2"}, "--dropout (dropout): drop probabilities must lie in [0, 1)"),
    ({"lr": float("inf")}, "--lr (lr): expected a finite number"),
]


@pytest.mark.parametrize("values, message", NAMED, ids=[str(v) for v, _ in NAMED])
def test_a_bad_setting_is_named_by_its_flag_and_its_key(values, message):
    from mpinn.base.errors import UsageError
    for toml, flags in ((values, BASE), ({}, {**BASE, **values})):
        with pytest.raises(UsageError) as caught:
            resolve(toml, flags)
        assert str(caught.value).startswith(message), (toml, str(caught.value))


def test_a_config_file_value_is_named_by_its_flag_too(cli, tmp_path):
    from conftest import expect_error
    (tmp_path / "c.toml").write_text('lr_schedule = "cosin"\nepochs = 1.5\n')
    expect_error(cli("train", "d.h5", "--out", tmp_path / "r", "--config", tmp_path / "c.toml"),
                 2, "--epochs (epochs): expected an integer, got 1.5")
    (tmp_path / "c.toml").write_text('lr_schedule = "cosin"\n')
    expect_error(cli("train", "d.h5", "--out", tmp_path / "r", "--config", tmp_path / "c.toml"),
                 2, "--lr-schedule (lr_schedule): 'cosin' is not one of constant, step, cosine "
                 "(did you mean cosine?)")
    expect_error(cli("train", "d.h5", "--out", tmp_path / "r", "--batch-size", 0), 2,
                 "--batch-size (batch_size) must be positive, got 0")
    assert not (tmp_path / "r").exists()


def parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, (*path, name))


def test_no_parser_takes_abbreviations():
    found = dict(parsers(build_parser()))
    assert ("data", "synth") in found and ("scaling", "run") in found
    for path, parser in found.items():
        assert parser.allow_abbrev is False, path


@pytest.mark.parametrize("args, message", [
    (["train", "d.h5", "--ep", "3"], "unrecognized arguments: --ep 3 (did you mean --epochs?)"),
    (["train", "d.h5", "--ep=3"], "unrecognized arguments: --ep=3 (did you mean --epochs?)"),
    (["train", "d.h5", "--drop", "0.2"], "--drop 0.2 (did you mean --dropout?)"),
    (["train", "d.h5", "--epoch", "5"], "--epoch 5 (did you mean --epochs?)"),
    (["train", "d.h5", "--lr-s", "cosine"],
     "--lr-s cosine (did you mean --lr-schedule or --lr-step-every or --lr-scaling?)"),
    (["scaling", "run", "d.h5", "--out", "s", "--rank", "1,2"], "(did you mean --ranks?)"),
    (["evaluate", "c.h5", "d.h5", "--spl", "val"], "--spl val (did you mean --split?)"),
    (["data", "synth", "o.h5", "--samples", "10", "--feat", "5"],
     "--feat 5 (did you mean --features?)"),
    (["--vers"], "unrecognized arguments: --vers (did you mean --version?)"),
])
def test_an_abbreviation_is_refused_naming_the_option(cli, args, message):
    from conftest import expect_error
    result = expect_error(cli(*args), 2, message)
    assert result.stdout == "" and result.stderr.startswith("usage: mpinn")


def test_options_spelt_in_full_still_parse():
    args = build_parser().parse(["train", "d.h5", "--epochs", "3", "--dropout=0.2", "--lr",
                                 "0.1", "--no-shuffle"])
    assert (args.epochs, args.dropout, args.lr, args.shuffle) == (3, "0.2", 0.1, "none")


def test_every_option_of_every_command_has_help():
    """`--help` explains each option of each command and subcommand (not only training's)."""
    missing = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif action.option_strings and not action.help:
                missing.append(f"{path} {action.option_strings[-1]}")

    walk(build_parser(), "mpinn")
    assert not missing, missing
