"""Bad input: exit 2 and one message; failures while running: every rank ends, exit 1."""

from __future__ import annotations

import os
import signal
import time

import h5py
import numpy as np
import pytest

from conftest import finish, mpi_script, mpinn, ok, rank_pids, start_mpinn, wait_for


def expect_usage_error(result, *words):
    text = result.stdout + result.stderr
    assert result.returncode == 2, f"exit {result.returncode}\n{text}"
    assert text.count("mpinn: error:") == 1, text  # once, not once per rank
    assert "Traceback" not in text, text
    for word in words:
        assert word in text, (word, text)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, synth):
    d = tmp_path_factory.mktemp("bad")
    (d / "text.h5").write_text("not an HDF5 file\n")
    with h5py.File(d / "notest.h5", "w") as f:
        f["train/x"] = np.zeros((4, 3), np.float32)
        f["train/y"] = np.zeros(4, np.int32)
    for name, labels, attrs in (("label5.h5", [0, 1, 2, 5], {"classes": 3}),
                                ("negative.h5", [0, 1, -1, 2], {})):
        with h5py.File(d / name, "w") as f:
            for split in ("train", "test"):
                f[f"{split}/x"] = np.zeros((4, 3), np.float32)
                f[f"{split}/y"] = np.array(labels, np.int32)
            f.attrs.update(attrs)
    with h5py.File(d / "nofeatures.h5", "w") as f:
        for split in ("train", "test"):
            f[f"{split}/x"] = np.zeros((4, 0), np.float32)
            f[f"{split}/y"] = np.zeros(4, np.int32)
    (d / "unknown.toml").write_text("hidden = [8]\nlearning_rate = 0.1\n")
    (d / "broken.toml").write_text("hidden = [8\n")
    return d


CASES = {
    "missing file": (["train", "{d}/nope.h5"], ["no such file"]),
    "not HDF5": (["train", "{d}/text.h5"], ["not a readable HDF5 file"]),
    "missing group": (["train", "{d}/notest.h5"], ["missing group '/test'"]),
    "unknown activation": (["train", "{synth}", "--activation", "swish"], ["activation", "swish"]),
    "zero batch size": (["train", "{synth}", "--batch-size", "0"], ["batch_size must be positive"]),
    "negative batch size": (["train", "{synth}", "--batch-size", "-4"], ["batch_size"]),
    "zero learning rate": (["train", "{synth}", "--lr", "0"], ["lr must be positive"]),
    "negative learning rate": (["train", "{synth}", "--lr=-0.1"], ["lr must be positive"]),
    "malformed hidden": (["train", "{synth}", "--hidden", "256,x"], ["hidden", "256,x"]),
    "empty hidden width": (["train", "{synth}", "--hidden", "256,,128"], ["hidden"]),
    "zero hidden width": (["train", "{synth}", "--hidden", "0"], ["hidden"]),
    "label out of range": (["train", "{d}/label5.h5"], ["labels must lie in [0, 2]", "to 5"]),
    "negative label": (["train", "{d}/negative.h5"], ["labels must lie", "from -1"]),
    "unknown config key": (["train", "{synth}", "--config", "{d}/unknown.toml"],
                           ["unknown configuration key 'learning_rate'"]),
    "broken config": (["train", "{synth}", "--config", "{d}/broken.toml"], ["not valid TOML"]),
    "unknown flag": (["train", "{synth}", "--learning-rate", "1"], ["unrecognized arguments"]),
    "no run directory": (["train", "{synth}"], ["--out"]),
    "bad dtype": (["train", "{synth}", "--dtype", "float16"], ["dtype"]),
    "config is a directory": (["train", "{synth}", "--config", "{d}"], ["cannot read it"]),
    "no features": (["train", "{d}/nofeatures.h5"], ["at least one feature"]),
    "resume and overwrite": (["train", "{synth}", "--resume", "--overwrite"],
                             ["--resume continues", "give one of them"]),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_message(case, bad_files, synth, tmp_path):
    args, words = CASES[case]
    args = [a.format(d=bad_files, synth=synth) for a in args]
    if args[0] == "train" and case != "no run directory":
        args += ["--out", str(tmp_path / "run")]
    expect_usage_error(mpinn(2, *args, timeout=60), *words)
    assert not (tmp_path / "run" / "checkpoint.h5").exists()


def test_feature_count_mismatch_in_evaluate(synth, digits, tmp_path):
    ok(mpinn(1, "train", synth, "--out", tmp_path / "a", "--epochs", 0, "--hidden", "8"))
    expect_usage_error(mpinn(2, "evaluate", tmp_path / "a" / "checkpoint.h5", digits),
                       "64 features but the model expects 12")


def test_evaluate_needs_a_checkpoint(synth, tmp_path):
    expect_usage_error(mpinn(2, "evaluate", synth, synth), "not an mpinn checkpoint")
    expect_usage_error(mpinn(2, "evaluate", tmp_path / "none.h5", synth), "no such checkpoint")


def test_existing_run_is_not_overwritten(synth, tmp_path):
    out = tmp_path / "run"
    ok(mpinn(2, "train", synth, "--out", out, "--epochs", 0, "--hidden", "8"))
    before = (out / "checkpoint.h5").read_bytes()
    expect_usage_error(mpinn(2, "train", synth, "--out", out, "--epochs", 1, "--hidden", "8"),
                       "already holds a run", "--overwrite")
    assert (out / "checkpoint.h5").read_bytes() == before
    ok(mpinn(2, "train", synth, "--out", out, "--epochs", 1, "--hidden", "8", "--overwrite"))


def test_predict_reports_bad_output_and_dataset(synth, tmp_path):
    ok(mpinn(1, "train", synth, "--out", tmp_path / "a", "--epochs", 0, "--hidden", "8"))
    ckpt = tmp_path / "a" / "checkpoint.h5"
    expect_usage_error(mpinn(None, "predict", ckpt, synth, tmp_path / "no" / "p.h5"),
                       "does not exist")
    expect_usage_error(mpinn(None, "predict", ckpt, synth, tmp_path), "is a directory")
    expect_usage_error(mpinn(None, "predict", ckpt, synth, tmp_path / "p.h5", "--dataset",
                             "train"), "no input dataset train")


def test_serial_commands_report_bad_input(tmp_path, synth):
    expect_usage_error(mpinn(None, "data", "synth", tmp_path / "x.h5", "--samples", "0"),
                       "--samples must be >= 1")
    expect_usage_error(mpinn(None, "data", "synth", tmp_path / "no" / "x.h5", "--samples", "5"),
                       "does not exist")
    expect_usage_error(mpinn(None, "data", "inspect", tmp_path / "none.h5"), "no such file")
    assert not list(tmp_path.glob("*.h5")) and not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("n,step", [(2, 3), (4, 1)])
def test_a_failing_rank_ends_the_job(n, step, synth, tmp_path):
    start = time.monotonic()
    result = mpi_script(n, "fail_rank.py", 1, step, "--", "train", synth, "--out", tmp_path / "r",
                        "--hidden", "8", "--epochs", 50, "--batch-size", 16, timeout=30)
    assert time.monotonic() - start < 30
    text = result.stdout + result.stderr
    assert result.returncode == 1, text
    assert text.count("injected read failure on rank 1") >= 1
    assert "mpinn: rank 1 of" in text


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
