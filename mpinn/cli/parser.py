"""The command line's machinery: a parser that speaks once under mpiexec and raises instead
of exiting, and the builder that turns the tables of commands.py into it."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from mpinn.base.errors import UsageError
from mpinn.cli.options import add_train_options
from mpinn.run.config import closest

Option = tuple[tuple[str, ...], dict[str, Any]]
JSON_STDOUT = " (- writes it to standard output, and the text to standard error)"


def arg(*flags: str, **settings: Any) -> Option:
    """One add_argument call, as data: arg('--samples', type=int, help='...')."""
    return flags, settings


@dataclass(frozen=True)
class Command:
    """A (sub)command: its parser's arguments, and either options or subcommands."""

    name: str
    help: str
    options: tuple[Option, ...] = ()
    commands: tuple[Command, ...] = ()  # subcommands, chosen into args.<dest>
    dest: str = ""
    description: str | None = None
    epilog: str | None = None
    train_options: str = ""  # "train" or "sweep": TrainConfig's options (options.py)


class BadArguments(UsageError):
    """argparse refused the command line; carries the usage line of the (sub)command."""

    def __init__(self, message: str, usage: str) -> None:
        super().__init__(message)
        self.usage = usage


def rank_hint() -> int:
    """This process's rank without initialising MPI (for messages before MPI starts).

    Launchers export it: MPICH/Hydra and Intel MPI PMI_RANK, Open MPI
    OMPI_COMM_WORLD_RANK, PMIx PMIX_RANK; srun sets SLURM_PROCID (0 for every
    rank under mpiexec, hence checked last).
    """
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


class Parser(argparse.ArgumentParser):
    """argparse that prints from rank 0 only, raises instead of exiting, and takes
    options only as spelt in full.

    Under mpiexec every rank parses the same argv: `--help` and `--version` print
    through `_print_message`, so only rank 0 prints; errors raise BadArguments,
    which `main` reports once. Abbreviations are refused (allow_abbrev=False, for
    every parser and subparser: they are all this class): argparse would take
    `--ep 3` for `--epochs 3` and `--drop 0.2` for `--dropout 0.2` silently, and a
    prefix that is unique today stops being so when an option is added. A refused
    prefix is named with the option it begins (closest).
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def _print_message(self, message: str, file=None) -> None:
        if rank_hint() == 0:
            super()._print_message(message, file)

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        raise BadArguments(message, self.format_usage())

    def _check_value(self, action: argparse.Action, value) -> None:
        # argparse's own check, with the closest choice named (mpinn trian -> train)
        if action.choices is not None and value not in action.choices:
            close = closest(str(value), map(str, action.choices))
            hint = (f"did you mean {close}?" if close else
                    "choose from " + ", ".join(map(str, action.choices)))
            raise argparse.ArgumentError(action, f"invalid choice: {value!r} ({hint})")

    def parse(self, argv: Sequence[str] | None) -> argparse.Namespace:
        """parse_args, refusing unknown arguments in the terms of the (sub)command typed."""
        argv = sys.argv[1:] if argv is None else list(argv)
        first = argv[0].split("=")[0] if argv else ""
        if first.startswith("-") and first not in self._option_string_actions:
            # argparse would skip it and take its value for the command: mpinn --hiden 64
            commands = next(a for a in self._actions
                            if isinstance(a, argparse._SubParsersAction)).choices
            close = closest(first, [s for s in self._option_string_actions
                                    if s.startswith("--")])
            self.error(f"unrecognized arguments: {first}"
                       + (f" (did you mean {close}?)" if close else "")
                       + f"; the command comes first: mpinn {{{','.join(commands)}}} "
                       f"[options]")
        args, extras = self.parse_known_args(argv)
        if extras:  # parse_args would report them as the top parser's, without a hint
            self.chosen(args).unrecognized(extras)
        return args

    def chosen(self, args: argparse.Namespace) -> Parser:
        """The (sub)parser of the command args names: `mpinn data inspect` -> its parser."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) \
                    and getattr(args, action.dest, None) in action.choices:
                return action.choices[getattr(args, action.dest)].chosen(args)
        return self

    def unrecognized(self, extras: list[str]) -> NoReturn:
        """Refuse arguments this parser does not know, naming the closest options."""
        options = [s for s in self._option_string_actions if s.startswith("--")]
        hints = [h for x in extras if x.startswith("-") for h in meant(x.split("=")[0], options)]
        hints = list(dict.fromkeys(hints))
        message = f"unrecognized arguments: {' '.join(extras)}"
        if hints:
            message += f" (did you mean {' or '.join(hints)}?)"
        self.error(message)

    def add_commands(self, command: Command) -> None:
        """The options of command, or its subcommands, each built the same way (every
        --json told that `-` is standard output: base/files.write_json)."""
        for flags, settings in command.options:
            if "--json" in flags:
                settings = {**settings, "help": settings.get("help", "") + JSON_STDOUT}
            self.add_argument(*flags, **settings)
        if command.train_options:
            add_train_options(self, sweep=command.train_options == "sweep")
        if command.commands:
            sub = self.add_subparsers(dest=command.dest, required=True, parser_class=Parser)
            for child in command.commands:
                extra = {k: v for k, v in (("description", child.description),
                                           ("epilog", child.epilog)) if v is not None}
                parser = sub.add_parser(child.name, help=child.help, **extra)
                parser.add_commands(child)


def meant(word: str, options: list[str]) -> list[str]:
    """The options an unknown one may have meant: all it begins (--lr-s: --lr-schedule,
    --lr-step-every, --lr-scaling), else the closest."""
    begun = [o for o in options if word.startswith("--") and o.startswith(word)]
    if len(begun) > 1:
        return begun
    close = closest(word, options)
    return [close] if close else []
