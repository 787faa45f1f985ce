"""The command line and the files it writes, per docs/design.md, section 3."""

from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import MPI_NOT_STARTED, expect_error, load_weights, mpinn, ok, run, write_synth
from mpinn.nn.model import MLP, Architecture
from mpinn.run.resolve import tomllib
from mpinn.train.session import INIT_STREAM


def test_module_and_console_script_are_the_same_program():
    via_module = ok(mpinn(None, "train", "--help"))
    script = shutil.which("mpinn") or str(Path(sys.executable).parent / "mpinn")
    via_script = ok(run([script, "train", "--help"]))
    assert via_module.stdout == via_script.stdout
    for flag in ("--batch-size", "GLOBAL", "--no-shuffle", "--config", "--dtype"):
        assert flag in via_module.stdout
    assert "exit codes" in ok(mpinn(None, "--help")).stdout


def test_epochs_0_writes_the_initial_weights(synth, tmp_path):
    ok(mpinn(2, "train", synth, "--out", tmp_path / "a", "--epochs", 0, "--hidden", "10,6",
             "--seed", 4, "--dtype", "float64"))
    ok(mpinn(3, "train", synth, "--out", tmp_path / "b", "--epochs", 0, "--hidden", "10,6",
             "--seed", 4, "--dtype", "float64"))
    ok(mpinn(1, "train", synth, "--out", tmp_path / "c", "--epochs", 0, "--hidden", "10,6",
             "--seed", 5, "--dtype", "float64"))
    a, b, c = (load_weights(tmp_path / r / "checkpoint.h5") for r in "abc")
    # an independent oracle: the model initialised from the same seed in this process
    model = MLP(Architecture((12, 10, 6, 4), dtype="float64"), 1)
    model.init(np.random.default_rng([4, INIT_STREAM]))
    expected = [v for pair in zip(model.W, model.b) for v in pair]
    for got_a, got_b, want in zip(a, b, expected):
        np.testing.assert_array_equal(got_a, want)
        np.testing.assert_array_equal(got_b, want)
    assert not np.array_equal(a[0], c[0])
    with h5py.File(tmp_path / "a" / "checkpoint.h5", "r") as f:
        assert f["model/W0"].shape == (12, 10) and f["model/b2"].shape == (4,)
        assert list(f["model"].attrs["sizes"]) == [12, 10, 6, 4]
        assert f["model"].attrs["activation"] == "relu" and f.attrs["epoch"] == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["epochs"] == 0 and summary["steps"] == 0
    assert 0 <= summary["test_accuracy"] <= 1


def test_run_directory_contract(synth, tmp_path):
    out = tmp_path / "run"
    result = ok(mpinn(2, "train", synth, "--out", out, "--epochs", 3, "--hidden", "16",
                      "--batch-size", 32, "--optimizer", "adam", "--lr", 0.01))
    assert result.stdout.count("epoch 3/3") == 1 and result.stderr == ""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert lines[-1]["step"] == 3 * -(-600 // 32)
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("ranks", "epochs", "final_train_loss", "test_accuracy", "samples_per_s"):
        assert summary[key] is not None, key
    assert summary["ranks"] == 2 and summary["final_train_loss"] == lines[-1]["train_loss"]
    assert summary["hosts"] == [socket.gethostname()] and summary["ranks_per_host"] == [2]
    assert "2 ranks on 1 host (" in result.stdout
    assert summary["test_accuracy"] == lines[-1]["test_accuracy"]
    assert summary["samples_per_s"] > 0
    phases = summary["step_time_s"]
    assert set(phases) == {"data", "forward", "backward", "allreduce", "update"}
    for stats in phases.values():
        assert 0 < stats["mean"] <= stats["max"]
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["optimizer"] == "adam" and config["hidden"] == [16]
    assert config["batch_size"] == 32 and config["shuffle"] == "global"


def test_saved_config_reproduces_the_run_bit_for_bit(synth, tmp_path):
    first = tmp_path / "first"
    ok(mpinn(2, "train", synth, "--out", first, "--epochs", 2, "--hidden", "12,6",
             "--activation", "tanh", "--weight-decay", 0.001, "--batch-size", 40))
    again = tmp_path / "again"
    ok(mpinn(2, "train", "--config", first / "config.toml", "--out", again))
    for a, b in zip(load_weights(first / "checkpoint.h5"), load_weights(again / "checkpoint.h5")):
        np.testing.assert_array_equal(a, b)


def test_flags_override_the_config_file(synth, tmp_path):
    (tmp_path / "c.toml").write_text('hidden = "9"\nepochs = 7\nbatch-size = 50\n')
    out = tmp_path / "run"
    ok(mpinn(1, "train", synth, "--config", tmp_path / "c.toml", "--epochs", 1, "--out", out))
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["hidden"] == [9] and config["epochs"] == 1 and config["batch_size"] == 50


def test_synth_is_a_function_of_its_arguments(cli, tmp_path):
    for name in ("a", "b"):
        ok(cli("data", "synth", tmp_path / f"{name}.h5", "--samples", 20000,
               "--features", 5, "--classes", 3, "--seed", 9))
    ok(cli("data", "synth", tmp_path / "c.h5", "--samples", 20000, "--features", 5,
           "--classes", 3, "--seed", 10))
    write_synth(tmp_path / "d.h5", samples=20000, test_samples=4000, features=5, classes=3,
                seed=9)  # the tests' data files hold what the command writes
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "d.h5") as d:
        assert dict(a.attrs) == dict(d.attrs)
        for name in ("train/x", "train/y", "test/x", "test/y"):
            np.testing.assert_array_equal(a[name][...], d[name][...])
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b, \
            h5py.File(tmp_path / "c.h5") as c:
        np.testing.assert_array_equal(a["train/x"][...], b["train/x"][...])
        np.testing.assert_array_equal(a["test/y"][...], b["test/y"][...])
        assert not np.array_equal(a["train/x"][...], c["train/x"][...])
        assert a["train/x"].shape == (20000, 5) and a["test/x"].shape == (4000, 5)
        assert a["train/x"].dtype == np.float32 and a["train/x"].id.get_offset() is not None
        counts = np.bincount(a["train/y"][...], minlength=3)
        assert len(counts) == 3 and counts.min() > 0
    listing = ok(cli("data", "inspect", tmp_path / "a.h5")).stdout
    assert "/train/x: shape (20000, 5)" in listing and "class counts" in listing


def test_synthetic_task_is_learnable(tmp_path):
    data = tmp_path / "s.h5"
    ok(mpinn(None, "data", "synth", data, "--samples", 8000, "--features", 16, "--classes", 5))
    out = tmp_path / "run"
    ok(mpinn(2, "train", data, "--out", out, "--hidden", "64", "--epochs", 8, "--lr", 0.05))
    summary = json.loads((out / "summary.json").read_text())
    with h5py.File(data) as f:
        majority = np.bincount(f["test/y"][...]).max() / len(f["test/y"])
    assert majority < 0.4 and summary["test_accuracy"] > 0.75, (majority, summary)


def test_regression_with_mse_and_predict(tmp_path):
    data = tmp_path / "r.h5"
    ok(mpinn(None, "data", "synth", data, "--samples", 3000, "--features", 6, "--classes", 2,
             "--regression"))
    out = tmp_path / "run"
    ok(mpinn(2, "train", data, "--out", out, "--loss", "mse", "--activation", "tanh",
             "--hidden", "32", "--epochs", 10, "--lr", 0.05, "--batch-size", 32))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["test_loss"] < 0.5 * lines[0]["test_loss"]
    assert lines[-1]["test_accuracy"] is None
    ok(mpinn(None, "predict", out / "checkpoint.h5", data, tmp_path / "p.h5"))
    with h5py.File(tmp_path / "p.h5") as p, h5py.File(data) as d:
        mse = np.mean((p["outputs"][...] - d["test/y"][...]) ** 2)
        assert mse == pytest.approx(lines[-1]["test_loss"], rel=1e-4)


def test_predict_agrees_with_evaluate(digits, tmp_path):
    out = tmp_path / "run"
    ok(mpinn(2, "train", digits, "--out", out, "--hidden", "32", "--epochs", 3,
             "--optimizer", "adam", "--lr", 0.005))
    evaluated = ok(mpinn(3, "evaluate", out / "checkpoint.h5", digits)).stdout
    ok(mpinn(None, "predict", out / "checkpoint.h5", digits, tmp_path / "p.h5"))
    with h5py.File(tmp_path / "p.h5") as p, h5py.File(digits) as d:
        accuracy = np.mean(p["predictions"][...] == d["test/y"][...])
        np.testing.assert_allclose(p["outputs"][...].sum(axis=1), 1, rtol=1e-5)
        assert np.array_equal(p["outputs"][...].argmax(axis=1), p["predictions"][...])
    assert f"accuracy {accuracy:.4f}" in evaluated


def test_serial_commands_do_not_start_mpi(synth, tmp_path):
    """data inspect/digits/idx and predict run on a login node without a launcher."""
    ok(mpinn(1, "train", synth, "--out", tmp_path / "run", "--epochs", 0, "--hidden", "4"))
    script = (f"import sys\nfrom mpinn.cli import main as cli\n"
              f"assert cli.main(['data', 'inspect', {str(synth)!r}, '--check']) == 0\n"
              f"assert cli.main(['data', 'digits', {str(tmp_path / 'd.h5')!r}]) == 0\n"
              f"assert cli.main(['predict', {str(tmp_path / 'run')!r}, {str(synth)!r}, "
              f"{str(tmp_path / 'p.h5')!r}]) == 0\n" + MPI_NOT_STARTED)
    ok(run([sys.executable, "-c", script]))


def test_version_and_help_print_once_under_mpiexec():
    from mpinn import __version__
    assert ok(mpinn(2, "--version")).stdout == f"mpinn {__version__}\n"
    for command in ([], ["train"], ["data", "inspect"]):
        serial = ok(mpinn(None, *command, "--help"))
        parallel = ok(mpinn(2, *command, "--help"))
        assert parallel.stdout == serial.stdout and parallel.stdout.count("usage:") == 1
        assert parallel.stderr == ""


def test_serial_commands_work_once_under_mpiexec(synth, tmp_path):
    """inspect and predict under mpiexec -n 2: rank 0 does the job, the others nothing."""
    ok(mpinn(1, "train", synth, "--out", tmp_path / "run", "--epochs", 0, "--hidden", "4"))
    for args in (["data", "inspect", synth], ["data", "inspect", synth, "--check"]):
        serial = ok(mpinn(None, *args)).stdout
        assert ok(mpinn(2, *args)).stdout == serial and serial.count("/train/x: shape") == 1
    result = ok(mpinn(2, "predict", tmp_path / "run", synth, tmp_path / "p.h5"))
    assert result.stdout == (f"wrote 150 predictions of {tmp_path / 'run' / 'checkpoint.h5'} "
                             f"to {tmp_path / 'p.h5'}\n")


def test_inspect_check_reports_a_nan_once(tmp_path):
    data = tmp_path / "nan.h5"
    x = np.zeros((5, 3), np.float32)
    x[3, 2] = np.nan
    with h5py.File(data, "w") as f:
        for split in ("train", "test"):
            f[f"{split}/x"] = x
            f[f"{split}/y"] = np.zeros(5, np.int32)
    result = expect_error(mpinn(2, "data", "inspect", data, "--check"), 2,
                          "/train/x row 3 is not finite")
    assert result.stdout.count("/train/x: shape (5, 3)") == 1  # the report, once


def test_digits_under_mpiexec_writes_one_file(digits, tmp_path):
    out = tmp_path / "d.h5"
    result = ok(mpinn(2, "data", "digits", out))
    assert result.stdout.count("/train/x: shape") == 1 and result.stderr == ""
    assert [p.name for p in tmp_path.iterdir()] == ["d.h5"]  # no temporary file left
    with h5py.File(out) as got, h5py.File(digits) as want:
        for name in ("train/x", "train/y", "test/x", "test/y"):
            np.testing.assert_array_equal(got[name][...], want[name][...])


@pytest.mark.parametrize("args,usage,message", [
    ([], "usage: mpinn [-h]", "the following arguments are required: command"),
    (["trian"], "usage: mpinn [-h]", "invalid choice: 'trian' (did you mean train?)"),
    (["data", "inspct"], "usage: mpinn data [-h]", "'inspct' (did you mean inspect?)"),
    (["train", "d.h5", "--hiden", "64"], "usage: mpinn train [-h]",
     "unrecognized arguments: --hiden 64 (did you mean --hidden?)"),
    (["data", "inspect", "d.h5", "--chek"], "usage: mpinn data inspect [-h]",
     "unrecognized arguments: --chek (did you mean --check?)"),
    (["evaluate", "c.h5", "d.h5", "--split", "tets"], "usage: mpinn evaluate [-h]",
     "argument --split: invalid choice: 'tets' (did you mean test?)"),
])
def test_usage_errors_name_the_command_and_the_closest_word(args, usage, message):
    result = mpinn(2, *args)
    expect_error(result, 2)
    assert result.stdout == "" and result.stderr.count("usage:") == 1
    assert result.stderr.startswith(usage)  # the usage of the (sub)command typed
    last = result.stderr.splitlines()[-1]  # after the usage, one line with one prefix
    assert last.startswith("mpinn: error: ") and last.endswith(message), result.stderr


def test_unknown_config_key_names_the_closest_key(synth, tmp_path):
    (tmp_path / "c.toml").write_text("learning_rate = 0.1\n")
    result = mpinn(2, "train", synth, "--config", tmp_path / "c.toml", "--out", tmp_path / "r")
    expect_error(result, 2, "unknown configuration key 'learning_rate' (did you mean lr?)")


@pytest.mark.fast
def test_closest_word():
    from mpinn.run.config import closest
    assert closest("hiden", ["hidden", "lr", "epochs"]) == "hidden"
    assert closest("--ep", ["--epochs", "--lr"]) == "--epochs"  # the one option it begins
    assert closest("cos", ["constant", "step", "cosine"]) == "cosine"
    assert closest("learning_rate", ["hidden", "lr", "epochs"]) == "lr"  # by its initials
    assert closest("--learning-rate", ["--lr", "--hidden"]) == "--lr"
    assert closest("batch-size", ["batch_size", "seed"]) == "batch_size"
    assert closest("colour", ["hidden", "lr", "epochs"]) is None


def test_a_reader_that_leaves_is_no_traceback(synth):
    """`mpinn data inspect F | head -1`: the pipe closes before mpinn writes; it ends
    quietly, no BrokenPipeError traceback."""
    import os
    import subprocess
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    try:
        done = subprocess.run([sys.executable, "-m", "mpinn", "data", "inspect", str(synth)],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
