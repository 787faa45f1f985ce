"""Bad input: exit 2 and one message; failures while running: every rank ends, exit 1."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import (
    expect_error,
    finish,
    leftover_segments,
    mpi_script,
    mpinn,
    ok,
    rank_pids,
    shm_segments,
    start_mpinn,
    wait_for,
)


def write_splits(path: Path, x: np.ndarray, y: np.ndarray, **attrs) -> None:
    """A dataset file with the same (bad) train and test split."""
    with h5py.File(path, "w") as f:
        for split in ("train", "test"):
            f[f"{split}/x"] = x
            f[f"{split}/y"] = y
        f.attrs.update(attrs)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, synth):
    d = tmp_path_factory.mktemp("bad")
    (d / "text.h5").write_text("not an HDF5 file\n")
    (d / "empty.h5").write_bytes(b"")
    with h5py.File(d / "notrain.h5", "w") as f:  # new rows to score, not a file to train on
        f["test/x"] = np.zeros((4, 3), np.float32)
        f["test/y"] = np.zeros(4, np.int32)
    with h5py.File(d / "xgroup.h5", "w") as f:  # /train/x is a group, not a dataset
        f.create_group("train/x")
        f["train/y"] = np.zeros(4, np.int32)
    zeros = np.zeros((4, 3), np.float32)
    write_splits(d / "label5.h5", zeros, np.array([0, 1, 2, 5], np.int32), classes=3)
    write_splits(d / "negative.h5", zeros, np.array([0, 1, -1, 2], np.int32))
    write_splits(d / "nofeatures.h5", np.zeros((4, 0), np.float32), np.zeros(4, np.int32))
    write_splits(d / "short_y.h5", zeros, np.zeros(3, np.int32))
    write_splits(d / "strings.h5", np.full((4, 3), b"a"), np.zeros(4, np.int32))
    write_splits(d / "y3d.h5", zeros, np.zeros((4, 2, 2), np.float32))
    write_splits(d / "norows.h5", np.zeros((0, 3), np.float32), np.zeros(0, np.int32))
    nan = zeros.copy()
    nan[2, 1] = np.nan
    write_splits(d / "nan.h5", nan, np.zeros(4, np.int32))
    configs = {"unknown": "hidden = [8]\nlearning_rate = 0.1\n", "broken": "hidden = [8\n",
               "hidden_text": 'hidden = "a"\n', "negative_epochs": "epochs = -1\n",
               "bool_lr": "lr = true\n", "float_epochs": "epochs = 1.5\n",
               "infinite_lr": "lr = inf\n", "table": "[train]\nlr = 0.1\n"}
    for name, text in configs.items():
        (d / f"{name}.toml").write_text(text)
    (d / "binary.toml").write_bytes(b"\xff\xfe")
    return d


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, synth):
    """A run directory with a checkpoint of the 12-feature synth model."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    ok(mpinn(1, "train", synth, "--out", out, "--epochs", 0, "--hidden", "8"))
    return out


CASES = {
    # data files
    "missing file": (["train", "{d}/nope.h5"], ["no such file"]),
    "not HDF5": (["train", "{d}/text.h5"], ["not a readable HDF5 file"]),
    "empty file": (["train", "{d}/empty.h5"], ["not a readable HDF5 file"]),
    "data is a directory": (["train", "{d}"], ["is a directory"]),
    "missing group": (["train", "{d}/notrain.h5"], ["missing group '/train'"]),
    "x is a group": (["train", "{d}/xgroup.h5"], ["'/train/x'"]),
    "x and y lengths differ": (["train", "{d}/short_y.h5"], ["4 rows but /train/y has 3"]),
    "x of strings": (["train", "{d}/strings.h5"], ["2-D float array"]),
    "y of 3 dimensions": (["train", "{d}/y3d.h5"], ["/train/y must hold", "(4, 2, 2)"]),
    "no rows": (["train", "{d}/norows.h5"], ["train and test splits are empty"]),
    "label out of range": (["train", "{d}/label5.h5"], ["labels must lie in [0, 2]", "to 5"]),
    "negative label": (["train", "{d}/negative.h5"], ["labels must lie", "from -1"]),
    "no features": (["train", "{d}/nofeatures.h5"], ["at least one feature"]),
    "inspect a NaN": (["data", "inspect", "{d}/nan.h5", "--check"], ["row 2 is not finite"]),
    "inspect short y": (["data", "inspect", "{d}/short_y.h5"], ["/train/y has 3"]),
    "idx without files": (["data", "idx", "{tmp}/o.h5", "--from", "{d}"], ["train-images"]),
    "digits into no dir": (["data", "digits", "{tmp}/no/o.h5"], ["does not exist"]),
    "synth without features": (["data", "synth", "{tmp}/o.h5", "--samples", "10",
                                "--features", "0"], ["--features must be >= 1"]),
    # flags
    "mistyped command": (["trian", "{synth}"], ["usage: mpinn [-h]", "did you mean train?"]),
    "no command": ([], ["usage: mpinn [-h]", "required: command"]),
    "unknown flag": (["train", "{synth}", "--hiden", "64"],
                     ["usage: mpinn train", "--hiden 64 (did you mean --hidden?)"]),
    "unknown long flag": (["train", "{synth}", "--learning-rate", "1"],
                          ["unrecognized arguments", "did you mean --lr?"]),
    "flag before command": (["--hidden", "8", "train"], ["the command comes first"]),
    "mistyped choice": (["train", "{synth}", "--shuffle", "globl"], ["did you mean global?"]),
    "not a number": (["train", "{synth}", "--lr", "fast"], ["invalid float value: 'fast'"]),
    "infinite learning rate": (["train", "{synth}", "--lr", "inf"], ["lr", "finite"]),
    "unknown activation": (["train", "{synth}", "--activation", "swish"], ["activation", "swish"]),
    "zero batch size": (["train", "{synth}", "--batch-size", "0"],
                        ["--batch-size (batch_size) must be positive, got 0"]),
    "batch size beyond any integer": (["train", "{synth}", "--batch-size",
                                       "99999999999999999999"],
                                      ["--batch-size (batch_size) is too large"]),
    "stall timeout under a second": (["train", "{synth}", "--stall-timeout", "0.5"],
                                     ["--stall-timeout (stall_timeout) must be 0",
                                      "at least 1 second"]),
    "cosine rising to lr_min": (["train", "{synth}", "--lr-schedule", "cosine", "--lr-min",
                                 "0.5"], ["--lr-min (lr_min) must not exceed --lr (lr)",
                                          "got 0.5 > 0.01"]),
    "model larger than memory": (["train", "{synth}", "--hidden", "1000000000"],
                                 ["12-1000000000-4", "does not fit in rank"]),
    "negative batch size": (["train", "{synth}", "--batch-size", "-4"], ["batch_size"]),
    "zero learning rate": (["train", "{synth}", "--lr", "0"], ["--lr (lr) must be positive"]),
    "negative learning rate": (["train", "{synth}", "--lr=-0.1"], ["--lr (lr) must be positive"]),
    "momentum of 1": (["train", "{synth}", "--momentum", "1"],
                      ["--momentum (momentum) must be < 1"]),
    "keep no checkpoints": (["train", "{synth}", "--keep-checkpoints", "0"],
                            ["--keep-checkpoints (keep_checkpoints) must be >= 1"]),
    "malformed hidden": (["train", "{synth}", "--hidden", "256,x"], ["hidden", "256,x"]),
    "empty hidden width": (["train", "{synth}", "--hidden", "256,,128"], ["hidden"]),
    "zero hidden width": (["train", "{synth}", "--hidden", "0"], ["hidden"]),
    "no run directory": (["train", "{synth}"], ["--out"]),
    "bad dtype": (["train", "{synth}", "--dtype", "float16"], ["dtype"]),
    "resume and overwrite": (["train", "{synth}", "--resume", "--overwrite"],
                             ["--resume continues", "give one of them"]),
    "resume nothing": (["train", "--resume"], ["holds no run to resume"]),
    "resume nothing, with data": (["train", "{synth}", "--resume"], ["holds no run to resume"]),
    "resume another model": (["train", "--out", "{run}", "--resume", "--hidden", "16"],
                             ["does not fit"]),
    "bench without steps": (["bench", "step", "--steps", "0"], ["--steps must be positive"]),
    # configuration files
    "unknown config key": (["train", "{synth}", "--config", "{d}/unknown.toml"],
                           ["unknown configuration key 'learning_rate' (did you mean lr?)"]),
    "config table": (["train", "{synth}", "--config", "{d}/table.toml"],
                     ["unknown configuration key 'train'"]),
    "broken config": (["train", "{synth}", "--config", "{d}/broken.toml"], ["not valid TOML"]),
    "binary config": (["train", "{synth}", "--config", "{d}/binary.toml"], ["not valid TOML"]),
    "missing config": (["train", "{synth}", "--config", "{d}/none.toml"], ["no such file"]),
    "config is a directory": (["train", "{synth}", "--config", "{d}"], ["cannot read it"]),
    "hidden as text": (["train", "{synth}", "--config", "{d}/hidden_text.toml"],
                       ["--hidden (hidden): expected comma-separated", "'a'"]),
    "negative epochs": (["train", "{synth}", "--config", "{d}/negative_epochs.toml"],
                        ["--epochs (epochs) must be >= 0, got -1"]),
    "boolean learning rate": (["train", "{synth}", "--config", "{d}/bool_lr.toml"],
                              ["--lr (lr): expected a number, got True"]),
    "fractional epochs": (["train", "{synth}", "--config", "{d}/float_epochs.toml"],
                          ["--epochs (epochs): expected an integer, got 1.5"]),
    "infinite lr in config": (["train", "{synth}", "--config", "{d}/infinite_lr.toml"],
                              ["--lr (lr): expected a finite number"]),
    # checkpoints
    "evaluate a data file": (["evaluate", "{synth}", "{synth}"], ["not an mpinn checkpoint"]),
    "evaluate no file": (["evaluate", "{d}/none.h5", "{synth}"], ["no such checkpoint"]),
    "evaluate a text file": (["evaluate", "{d}/text.h5", "{synth}"], ["not an mpinn checkpoint"]),
    "evaluate a plain directory": (["evaluate", "{d}", "{synth}"],
                                   ["directory without a checkpoint.h5"]),
    "evaluate other features": (["evaluate", "{run}", "{digits}"],
                                ["64 features but the model expects 12"]),
    "evaluate a bad split": (["evaluate", "{run}", "{synth}", "--split", "tset"],
                             ["did you mean test?"]),
    "predict into a directory": (["predict", "{run}", "{synth}", "{tmp}"], ["is a directory"]),
    "predict other features": (["predict", "{run}", "{digits}", "{tmp}/p.h5"],
                               ["the model expects rows of 12 features"]),
}


def snapshot(*roots: Path) -> dict[str, tuple[int, int, str]]:
    """(size, mtime_ns, sha256) of every file under roots, and every directory, by path."""
    files = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_dir():
                files[str(path)] = "directory"
            elif path.name == ".lock":  # the lock names its last holder, whoever that was
                files[str(path)] = "lock file"
            elif path.is_file():
                stat = path.stat()
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                files[str(path)] = (stat.st_size, stat.st_mtime_ns, digest)
    return files


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_message(case, bad_files, synth, digits, run_dir, tmp_path):
    args, words = CASES[case]
    places = {"d": bad_files, "synth": synth, "digits": digits, "run": run_dir, "tmp": tmp_path}
    args = [a.format(**places) for a in args]
    if args[:1] == ["train"] and case != "no run directory" and "--out" not in args:
        args += ["--out", str(tmp_path / "run")]
    roots = (bad_files, synth.parent, digits.parent, run_dir, tmp_path)
    before = snapshot(*roots)
    expect_error(mpinn(2, *args, timeout=60), 2, *words)
    assert snapshot(*roots) == before  # nothing modified, nothing left behind
    assert not (tmp_path / "run").exists()


def test_resume_of_an_empty_directory_changes_nothing(synth, tmp_path):
    (tmp_path / "run").mkdir()
    for data in ((), (synth,)):
        expect_error(mpinn(2, "train", *data, "--out", tmp_path / "run", "--resume"), 2,
                     f"--resume: {tmp_path / 'run'} holds no run to resume")
        assert not list((tmp_path / "run").iterdir())  # no lock, no checkpoints/


def test_a_refusal_after_the_directory_is_taken_changes_nothing(parallel_env, synth, tmp_path):
    """Refused while opening the data for reading (a bad MPINN_MPIO_HINTS), after the run
    directory was taken: a new directory is removed again, and an --overwrite keeps the
    old run."""
    old = tmp_path / "old"
    ok(parallel_env.mpinn(2, "train", synth, "--out", old, "--epochs", 1, "--hidden", "8"))
    before = snapshot(old)
    parallel_env.env["MPINN_MPIO_HINTS"] = "bogus"
    try:
        for out, extra in ((tmp_path / "new", ()), (old, ("--overwrite",))):
            expect_error(parallel_env.mpinn(2, "train", synth, "--out", out, "--io", "mpio",
                                            *extra), 2, "MPINN_MPIO_HINTS: expected key=value")
    finally:
        del parallel_env.env["MPINN_MPIO_HINTS"]
    assert not (tmp_path / "new").exists()
    assert snapshot(old) == before


def test_existing_run_is_not_overwritten(synth, tmp_path):
    out = tmp_path / "run"
    ok(mpinn(2, "train", synth, "--out", out, "--epochs", 0, "--hidden", "8"))
    before = (out / "checkpoint.h5").read_bytes()
    expect_error(mpinn(2, "train", synth, "--out", out, "--epochs", 1, "--hidden", "8"), 2,
                 "already holds a run", "--overwrite")
    assert (out / "checkpoint.h5").read_bytes() == before
    ok(mpinn(2, "train", synth, "--out", out, "--epochs", 1, "--hidden", "8", "--overwrite"))


def test_predict_reports_bad_output_and_dataset(synth, run_dir, tmp_path):
    ckpt = run_dir / "checkpoint.h5"
    expect_error(mpinn(None, "predict", ckpt, synth, tmp_path / "no" / "p.h5"), 2,
                 "does not exist")
    expect_error(mpinn(None, "predict", ckpt, synth, tmp_path / "p.h5", "--dataset", "train"),
                 2, "no input dataset train")
    assert not list(tmp_path.iterdir())


@pytest.mark.fast
def test_serial_commands_report_bad_input(cli, tmp_path):
    expect_error(cli("data", "synth", tmp_path / "x.h5", "--samples", "0"), 2,
                 "--samples must be >= 1")
    expect_error(cli("data", "synth", tmp_path / "no" / "x.h5", "--samples", "5"), 2,
                 "does not exist")
    expect_error(cli("data", "inspect", tmp_path / "none.h5"), 2, "no such file")
    assert not list(tmp_path.iterdir())  # no file, no temporary file


@pytest.mark.parametrize("n,step", [(2, 3), (4, 1)])
def test_a_failing_rank_ends_the_job(n, step, synth, tmp_path):
    before = shm_segments()
    start = time.monotonic()
    result = mpi_script(n, "fail_rank.py", 1, step, "--", "train", synth, "--out", tmp_path / "r",
                        "--hidden", "8", "--epochs", 50, "--batch-size", 16, timeout=30)
    assert time.monotonic() - start < 30
    text = result.stdout + result.stderr
    assert result.returncode == 1, text
    assert text.count("injected read failure on rank 1") >= 1
    assert "mpinn: rank 1 of" in text
    assert not leftover_segments(before), "MPI_Abort left this node's segment in /dev/shm"


def test_a_killed_rank_ends_the_job(synth, tmp_path):
    """kill -9 one rank mid-training: the launcher must end the others, non-zero, < 30 s."""
    out = tmp_path / "killed"
    proc = start_mpinn(3, "train", synth, "--out", out, "--hidden", "8", "--epochs", 100000,
                       "--batch-size", 8)
    try:
        metrics = out / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and metrics.read_text(), proc)
        pids = rank_pids(str(out))
        assert len(pids) == 3, pids
        os.kill(max(pids), signal.SIGKILL)
        killed_at = time.monotonic()
        result = finish(proc, timeout=30)
        assert time.monotonic() - killed_at < 30
        assert result.returncode != 0
        time.sleep(0.5)
        assert rank_pids(str(out)) == []  # no rank left behind
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
