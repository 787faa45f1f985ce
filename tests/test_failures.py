"""What mpinn guarantees on failure (docs/failures.md): each way a run used to lose work, injected
for real (a too large learning rate, non-finite input, two runs on one directory, a full
tmpfs, a read-only mount, a mode-555 directory without root's override, Ctrl-C), with the
exit code, the one message, and afterwards the newest good checkpoint resumed to the very
weights an uninterrupted run reaches (the oracle: that run, at the same rank count)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import (
    expect_error,
    finish,
    load_weights,
    mounted,
    mpiexec,
    mpinn,
    ok,
    rank_pids,
    read_only_view,
    root_only,
    run,
    start,
    start_mpinn,
    strict_json_lines,
    text_of,
    unprivileged,
    wait_for,
)
from mpinn.run import checkpoint

ARGS = ["--hidden", "16", "--dtype", "float64", "--batch-size", 50, "--optimizer", "adam",
        "--seed", 4]  # synth: 600 rows, so 12 steps per epoch


@pytest.fixture(scope="module")
def reference(synth, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must end equal to: 3 epochs, 2 ranks."""
    out = tmp_path_factory.mktemp("reference") / "run"
    ok(mpinn(2, "train", synth, "--out", out, "--epochs", 3, *ARGS))
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    for x, y in zip(load_weights(a / "checkpoint.h5"), load_weights(b / "checkpoint.h5"),
                    strict=True):
        np.testing.assert_array_equal(x, y)


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """The bytes of every file of a run (but its lock file, which each run rewrites)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def no_temporary_files(run_dir: Path) -> bool:
    return not [p for p in run_dir.rglob("*") if ".tmp-" in p.name]


def good_checkpoint(run_dir: Path) -> checkpoint.Checkpoint:
    ckpt = checkpoint.load(str(run_dir / "checkpoint.h5"))
    assert all(np.isfinite(w).all() for w in ckpt.weights)
    assert all(np.isfinite(v).all() for v in ckpt.optimizer_state.values())
    return ckpt


def with_value(source: Path, target: Path, split: str, row: int, value: float) -> Path:
    shutil.copy(source, target)
    with h5py.File(target, "r+") as f:
        f[f"{split}/x"][row, 3] = value
    return target


# -- row 1: divergence ---------------------------------------------------------------------

def test_a_too_large_learning_rate_stops_at_once_and_keeps_the_good_run(synth, reference,
                                                                         tmp_path):
    run_dir = tmp_path / "run"
    ok(mpinn(2, "train", synth, "--out", run_dir, "--epochs", 1, *ARGS))
    before = snapshot(run_dir)
    # adam's steps are about lr in size: after the first update to ~1e200, the next forward
    # pass overflows float64
    result = mpinn(2, "train", "--out", run_dir, "--resume", "--epochs", 3, "--lr", "1e200")
    expect_error(result, 1, "training diverged at epoch 2, step 2 of 12 (global step 14)",
                 "Likely cause: the learning rate", "checkpoint.h5, holds step 12")
    assert snapshot(run_dir) == before  # config.toml still holds the run's own lr
    ok(mpinn(2, "train", "--out", run_dir, "--resume", "--epochs", 3))
    assert_same_weights(reference, run_dir)
    assert [m["epoch"] for m in strict_json_lines(run_dir / "metrics.jsonl")] == [1, 2, 3]


def test_rotation_never_keeps_a_diverged_checkpoint(synth, tmp_path):
    run_dir = tmp_path / "run"
    result = mpinn(3, "train", synth, "--out", run_dir, "--lr", "1e6", "--hidden", "16",
                   "--epochs", 50, "--checkpoint-every", 1, "--keep-checkpoints", 2)
    expect_error(result, 1, "training diverged at epoch", "Likely cause: the learning rate")
    kept = sorted((run_dir / "checkpoints").iterdir())
    assert len(kept) == 2
    for path in kept:
        ckpt = checkpoint.load(str(path))
        assert all(np.isfinite(w).all() for w in ckpt.weights), path
    newest = good_checkpoint(run_dir)
    assert f"checkpoint.h5, holds step {newest.step}" in text_of(result)
    assert newest.step == checkpoint.load(str(kept[-1])).step


def set_value(path: Path, split: str, row: int, value: float) -> None:
    with h5py.File(path, "r+") as f:
        f[f"{split}/x"][row, 3] = value


def test_a_non_finite_input_row_is_bad_input_and_the_steps_before_it_are_kept(
        synth, reference, tmp_path):
    data = tmp_path / "data.h5"
    shutil.copy(synth, data)
    with h5py.File(synth) as f:
        original = float(f["train/x"][437, 3])
    set_value(data, "train", 437, np.inf)
    run_dir = tmp_path / "run"
    result = mpinn(2, "train", data, "--out", run_dir, "--epochs", 3, *ARGS)
    expect_error(result, 2, f"{data}: /train/x row 437 is not finite", "steps before it are "
                 "saved: fix the row, then continue with", "--resume")
    assert 0 < good_checkpoint(run_dir).step < 12  # where the row came up in epoch 1
    expect_error(mpinn(None, "data", "inspect", data, "--check"), 2, "/train/x row 437")
    set_value(data, "train", 437, original)  # the row fixed: nothing was lost
    ok(mpinn(2, "train", "--out", run_dir, "--resume"))
    assert_same_weights(reference, run_dir)


@pytest.mark.parametrize("extra", [["--no-prefetch"], ["--shuffle", "block", "--block-rows",
                                                        "16", "--window-rows", "100"]])
def test_a_non_finite_row_is_found_by_every_way_of_reading(extra, synth, tmp_path):
    data = with_value(synth, tmp_path / "inf.h5", "train", 0, -np.inf)
    result = mpinn(3, "train", data, "--out", tmp_path / "run", "--hidden", "8", *extra)
    expect_error(result, 2, f"{data}: /train/x row 0 is not finite")


def test_a_non_finite_row_is_found_by_the_mpio_reader(synth, parallel_env, tmp_path):
    data = with_value(synth, tmp_path / "nan.h5", "train", 599, np.nan)
    result = parallel_env.mpinn(2, "train", data, "--out", tmp_path / "run", "--io", "mpio",
                                "--hidden", "8")
    expect_error(result, 2, f"{data}: /train/x row 599 is not finite")


def test_a_huge_input_value_is_named_as_the_cause_of_divergence(synth, tmp_path):
    data = with_value(synth, tmp_path / "huge.h5", "train", 21, 1e30)
    result = mpinn(2, "train", data, "--out", tmp_path / "run", "--hidden", "8",
                   "--no-shuffle", "--batch-size", 50)
    expect_error(result, 1, "diverged at epoch 1, step 1 of 12",
                 "Likely cause: the input", "|x| = 1e+30")
    expect_error(mpinn(None, "data", "inspect", data, "--check"), 2,
                 "/train/x row 21 holds |x| = 1e+30, beyond 1e+06")


def test_a_non_finite_test_row_is_bad_input_and_the_epoch_is_kept(synth, reference,
                                                                    tmp_path):
    data = tmp_path / "data.h5"
    shutil.copy(synth, data)
    set_value(data, "test", 149, np.nan)
    run_dir = tmp_path / "run"
    result = mpinn(2, "train", data, "--out", run_dir, "--epochs", 3, *ARGS)
    expect_error(result, 2, f"{data}: /test/x row 149 is not finite",
                 "epoch 1 is saved without its test scores")
    assert good_checkpoint(run_dir).step == 12
    assert strict_json_lines(run_dir / "metrics.jsonl")[0]["test_loss"] is None
    expect_error(mpinn(3, "evaluate", run_dir, data), 2, "/test/x row 149")
    shutil.copy(synth, data)
    ok(mpinn(2, "train", "--out", run_dir, "--resume"))
    assert_same_weights(reference, run_dir)


def test_a_bad_test_row_in_the_last_epoch_is_finished_by_resume(synth, tmp_path):
    data = tmp_path / "data.h5"
    shutil.copy(synth, data)
    set_value(data, "test", 0, np.inf)
    run_dir = tmp_path / "run"
    expect_error(mpinn(2, "train", data, "--out", run_dir, "--epochs", 1, "--hidden", "8"), 2,
                 "/test/x row 0 is not finite", "epoch 1 is saved without its test scores")
    assert not (run_dir / "summary.json").exists()
    shutil.copy(synth, data)
    finished = ok(mpinn(2, "train", "--out", run_dir, "--resume"))
    assert "has no summary.json: evaluating the test split and writing it" in finished.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 1 and 0 <= summary["test_accuracy"] <= 1
    assert summary["final_train_loss"] == strict_json_lines(run_dir / "metrics.jsonl")[0][
        "train_loss"]
    assert "is complete" in ok(mpinn(2, "train", "--out", run_dir, "--resume")).stdout


# -- row 2: one run per directory --------------------------------------------------------

def test_two_runs_on_one_directory_one_is_refused_and_the_directory_is_consistent(
        synth, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", synth, "--out", run_dir, "--hidden", "64,64", "--batch-size", 5,
            "--epochs", 60]  # about 3 s: the second starts while the first runs
    first = start_mpinn(2, *args, "--seed", 1)
    time.sleep(0.1)
    second = start_mpinn(2, *args, "--seed", 2)
    results = [finish(first, timeout=120), finish(second, timeout=120)]
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 2], [text_of(r) for r in results]
    winner, loser = sorted(results, key=lambda r: r.returncode)
    expect_error(loser, 2, f"run directory {run_dir} is in use by the run of PID", "on host")
    seed = 1 if winner is results[0] else 2
    config = (run_dir / "config.toml").read_text()
    assert f"seed = {seed}\n" in config
    assert checkpoint.load(str(run_dir / "checkpoint.h5")).config == config
    assert [m["epoch"] for m in strict_json_lines(run_dir / "metrics.jsonl")] == \
        list(range(1, 61))


def test_a_lock_file_is_refused_while_its_run_lives_and_replaced_once_it_is_dead(
        synth, tmp_path):
    """MPINN_LOCK=file: the O_EXCL lock file, for file systems whose flock is node-local."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, MPINN_LOCK="file")
    cmd = [mpiexec(), "-n", 2, sys.executable, "-m", "mpinn", "train", synth, "--out", run_dir,
           "--hidden", "8", "--batch-size", 5, "--epochs", 10000, "--checkpoint-every", 10]
    holder = start(cmd, env=env)
    try:
        wait_for(lambda: (run_dir / "checkpoint.h5").exists(), holder)
        lock_text = (run_dir / ".lock.pid").read_text()
        refused = run([*cmd, "--resume"], env=env, timeout=60)
        expect_error(refused, 2, "is in use by the run of PID", lock_text.split()[1][4:])
        for pid in rank_pids(str(run_dir)):  # kill -9: the lock file stays behind, stale
            os.kill(pid, signal.SIGKILL)
        finish(holder, timeout=30)
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
    assert (run_dir / ".lock.pid").exists()
    resumed = run([*cmd, "--resume", "--seed", 99], env=env, timeout=60)
    # the stale lock was replaced: the run got as far as comparing its checkpoint
    expect_error(resumed, 2, "does not fit this configuration (--seed (seed) 0 -> 99")
    assert not (run_dir / ".lock.pid").exists()  # released by its holder


# -- rows 3 and 4: the file system refuses -----------------------------------------------

def checkpoint_bytes(synth: Path, tmp_path: Path) -> int:
    ok(mpinn(1, "train", synth, "--out", tmp_path / "size", "--epochs", 0, *ARGS))
    return (tmp_path / "size" / "checkpoint.h5").stat().st_size


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint(synth, reference, tmp_path):
    root_only("a small tmpfs (ENOSPC)")
    ckpt = checkpoint_bytes(synth, tmp_path)
    disk = tmp_path / "disk"
    # room for the config, the metrics and two checkpoints (--keep-checkpoints 2), but not
    # for the third one's temporary file beside them
    with mounted(disk, "-t", "tmpfs", "-o", f"size={2 * ckpt + 24 * 1024}", "tmpfs"):
        run_dir = disk / "run"
        result = mpinn(2, "train", synth, "--out", run_dir, "--epochs", 3, *ARGS)
        expect_error(result, 1, "cannot write checkpoint", "step-000000036.h5",
                     "No space left on device (ENOSPC)", "MB free there now")
        assert no_temporary_files(run_dir)
        assert good_checkpoint(run_dir).step == 24
        shutil.copytree(run_dir, tmp_path / "moved", symlinks=True)
    ok(mpinn(2, "train", "--out", tmp_path / "moved", "--resume"))
    assert_same_weights(reference, tmp_path / "moved")


def test_a_read_only_file_system_is_reported_before_training(synth, reference, tmp_path):
    root_only("a read-only bind mount (EROFS)")
    run_dir = tmp_path / "run"
    ok(mpinn(2, "train", synth, "--out", run_dir, "--epochs", 1, *ARGS))
    before = snapshot(run_dir)
    with read_only_view(run_dir, tmp_path / "ro") as view:
        began = time.monotonic()
        result = mpinn(2, "train", "--out", view, "--resume", "--epochs", 3)
        expect_error(result, 1, f"cannot write in run directory {view}",
                     "Read-only file system (EROFS)", "write the run elsewhere")
        assert time.monotonic() - began < 30
    assert snapshot(run_dir) == before
    ok(mpinn(2, "train", "--out", run_dir, "--resume", "--epochs", 3))
    assert_same_weights(reference, run_dir)


@pytest.mark.parametrize("locked", ["run directory", "checkpoints"])
def test_an_unwritable_directory_is_reported_before_training(locked, synth, reference,
                                                             tmp_path):
    run_dir = tmp_path / "run"
    ok(mpinn(2, "train", synth, "--out", run_dir, "--epochs", 1, *ARGS))
    before = snapshot(run_dir)
    target = run_dir if locked == "run directory" else run_dir / "checkpoints"
    target.chmod(0o555)
    try:
        cmd = [mpiexec(), "-n", 2, sys.executable, "-m", "mpinn", "train", "--out", run_dir,
               "--resume", "--epochs", 3]
        result = run(unprivileged(cmd), timeout=60)
    finally:
        target.chmod(0o755)
    expect_error(result, 1, "Permission denied (EACCES)", str(target), "fix the permissions")
    assert "epoch 2/3" not in result.stdout  # refused at the start, not after an epoch
    assert snapshot(run_dir) == before
    ok(mpinn(2, "train", "--out", run_dir, "--resume", "--epochs", 3))
    assert_same_weights(reference, run_dir)


def test_orphaned_temporary_files_are_removed_at_resume(synth, tmp_path):
    run_dir = tmp_path / "run"
    ok(mpinn(1, "train", synth, "--out", run_dir, "--epochs", 1, *ARGS))
    orphans = [run_dir / ".metrics.jsonl.tmp-99999", run_dir / "checkpoints" /
               ".step-000000024.h5.tmp-99999", run_dir / "checkpoint.h5.tmp-4242"]
    foreign = run_dir / ".predictions.h5.tmp-777"  # another program's, writing there now
    for path in (*orphans, foreign):
        path.write_bytes(b"\0" * 1000)
    ok(mpinn(2, "train", "--out", run_dir, "--resume", "--epochs", 2))
    assert not any(path.exists() for path in orphans) and foreign.exists()


# -- row 5: Ctrl-C ---------------------------------------------------------------------------

def test_ctrl_c_checkpoints_and_resume_is_bit_identical(synth, reference, tmp_path):
    run_dir = tmp_path / "run"
    args = ["--epochs", 40, *ARGS, "--batch-size", 5]  # a few seconds of 120 steps per epoch
    proc = start_mpinn(2, "train", synth, "--out", run_dir, *args)
    wait_for(lambda: (run_dir / "metrics.jsonl").exists(), proc)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C: mpiexec forwards it
    result = expect_error(finish(proc, timeout=60), 3, "stopped by a signal")
    for line in result.stderr.splitlines():  # messages of several ranks never share a line
        assert line.count("mpinn:") <= 1 and line.count("[mpiexec") <= 1, line
    assert "UCX" not in text_of(result) and "WARN" not in text_of(result)  # nothing left open
    hint = f"continue with: mpiexec -n 2 mpinn train --out {run_dir} --resume"
    assert result.stderr.rstrip().endswith(hint), result.stderr
    stopped = good_checkpoint(run_dir)
    assert 0 < stopped.step < 40 * 120
    command = hint.split(": ", 1)[1].split()  # run as printed, with this launcher and Python
    command[command.index("mpiexec")] = mpiexec()
    command[command.index("mpinn"):command.index("mpinn") + 1] = [sys.executable, "-m", "mpinn"]
    ok(run(command))
    assert json.loads((run_dir / "summary.json").read_text())["ranks"] == 2
    ok(mpinn(2, "train", synth, "--out", tmp_path / "reference", *args))
    assert_same_weights(tmp_path / "reference", run_dir)


@pytest.mark.parametrize("to", ["the job", "the waiting rank"])
def test_a_second_signal_ends_a_job_that_cannot_stop(to, synth, tmp_path):
    """One rank is frozen (SIGSTOP), so the other cannot reach a step boundary: it waits
    inside MPI, where no Python handler runs. A second Ctrl-C (mpiexec aborts), or a second
    signal to the waiting rank itself (the kernel's default action), must end the job."""
    run_dir = tmp_path / "run"
    proc = start_mpinn(2, "train", synth, "--out", run_dir, "--hidden", "8", "--epochs",
                       100000, "--batch-size", 5)
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").exists(), proc)
        waiting, frozen = rank_pids(str(run_dir))
        os.kill(frozen, signal.SIGSTOP)
        time.sleep(1)  # the other rank is now waiting inside the step's Allreduce

        def interrupt() -> None:
            if to == "the job":
                os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: mpiexec forwards it
            else:
                os.kill(waiting, signal.SIGINT)
        interrupt()
        time.sleep(1)
        assert proc.poll() is None  # the first waits for a step boundary that cannot come
        interrupt()
        began = time.monotonic()
        finish(proc, timeout=30)  # (its exit code is mpiexec's business)
        assert time.monotonic() - began < 15
        time.sleep(0.5)
        assert rank_pids(str(run_dir)) == []  # no rank left behind, the frozen one included
    finally:
        for pid in rank_pids(str(run_dir)):
            os.kill(pid, signal.SIGKILL)


# -- rows 6 to 8: paths, finished runs, run directories, empty splits --------------------

def test_resume_from_another_directory_and_of_a_finished_run(synth, reference, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(synth, work / "data.h5")
    ok(mpinn(2, "train", "data.h5", "--out", "run", "--epochs", 1, *ARGS, cwd=work))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ok(mpinn(2, "train", "--out", work / "run", "--resume", "--epochs", 3, cwd=elsewhere))
    assert_same_weights(reference, work / "run")
    summary = json.loads((work / "run" / "summary.json").read_text(),
                         parse_constant=lambda c: pytest.fail(c))
    assert summary["samples_per_s"] > 0 and summary["resumed_from_step"] == 12
    before = snapshot(work / "run")
    again = ok(mpinn(2, "train", "--out", work / "run", "--resume", cwd=elsewhere))
    assert "is complete: 3 of 3 epochs, 36 steps; nothing to do" in again.stdout
    assert "resumed from" not in again.stdout
    assert snapshot(work / "run") == before  # summary.json untouched: nothing written


def test_evaluate_and_predict_take_a_run_directory(synth, tmp_path):
    run_dir = tmp_path / "run"
    ok(mpinn(2, "train", synth, "--out", run_dir, "--epochs", 1, "--hidden", "8"))
    by_dir = ok(mpinn(2, "evaluate", run_dir, synth)).stdout.split("\n", 1)
    by_file = ok(mpinn(2, "evaluate", run_dir / "checkpoint.h5", synth)).stdout.split("\n", 1)
    assert by_dir[1] == by_file[1] and "test: 150 rows" in by_dir[1]  # the same scores
    assert by_dir[0].endswith("the run's newest checkpoint)")  # each says which model
    assert by_file[0].endswith("the checkpoint file given)")
    ok(mpinn(None, "predict", run_dir, synth, tmp_path / "p.h5"))
    expect_error(mpinn(2, "evaluate", tmp_path, synth), 2, "without a checkpoint.h5")
    expect_error(mpinn(2, "evaluate", run_dir, tmp_path), 2, "is a directory, not an HDF5")


def test_evaluate_on_an_empty_split_reports_no_rows(tmp_path):
    data = tmp_path / "e.h5"
    ok(mpinn(None, "data", "synth", data, "--samples", 100, "--test-samples", 0))
    ok(mpinn(1, "train", data, "--out", tmp_path / "run", "--epochs", 1, "--hidden", "8"))
    result = ok(mpinn(2, "evaluate", tmp_path / "run", data))
    assert result.stdout.count("test: no rows") == 1 and result.stderr == ""
