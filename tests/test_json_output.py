"""`--json -` writes the JSON to standard output, alone (the human-readable text goes to
standard error), for every command that has a --json option; `--json FILE` still writes
the file. evaluate's own checks are in test_evaluate.py."""

from __future__ import annotations

import argparse
import json

import pytest

from conftest import mpinn, ok, probed
from mpinn.cli.commands import build_parser

BENCH = {
    "bench io": lambda data: ["bench", "io", data, "--batch-size", 64, "--steps", 2,
                              "--hidden", "8"],
    "bench step": lambda data: ["bench", "step", "--features", 4, "--hidden", "8",
                                "--classes", 2, "--batch-size", 8, "--steps", 2],
}


def json_options(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, action) of every --json option of the parser and its subparsers."""
    for action in parser._actions:
        if "--json" in action.option_strings:
            yield path, action
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from json_options(sub, (*path, name))


@pytest.mark.fast
def test_every_json_option_says_that_dash_is_standard_output():
    found = {" ".join(path): action for path, action in json_options(build_parser())}
    assert set(found) == {"evaluate", "bench io", "bench step", "bench comm", "bench sampler"}
    for command, action in found.items():
        assert "(- writes it to standard output" in action.help, command


@pytest.mark.fast
@pytest.mark.parametrize("command", BENCH)
def test_bench_json_dash_is_standard_output_alone(command, cli, synth, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a file named "-" would appear
    args = BENCH[command](probed(synth))
    result = ok(cli(*args, "--json", "-"))
    got = json.loads(result.stdout)  # all of stdout is one JSON document
    assert got["ranks"] == 1
    assert result.stderr.startswith(f"mpinn {command}: ")  # the table, on stderr
    assert not (tmp_path / "-").exists()
    result = ok(cli(*args, "--json", tmp_path / "out.json"))
    assert set(json.loads((tmp_path / "out.json").read_text())) == set(got)
    assert result.stdout.startswith(f"mpinn {command}: ") and result.stderr == ""


def test_bench_comm_json_dash_is_standard_output_alone(tmp_path):
    result = ok(mpinn(2, "bench", "comm", "--sizes", "8,64", "--budget", 0.01, "--repeats", 3,
                      "--json", "-", timeout=120, cwd=tmp_path))
    got = json.loads(result.stdout)
    assert got["ranks"] == 2 and got["sizes"] == [8, 64]
    assert "mpinn bench comm: 2 ranks" in result.stderr
    assert not (tmp_path / "-").exists()
