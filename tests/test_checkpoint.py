"""Checkpoints and exact resume: by --epochs, from mid-epoch checkpoints, by signal,
after kill -9 during checkpoint writes, with a different number of ranks."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    expect_error,
    finish,
    mpinn,
    ok,
    rank_pids,
    start_mpinn,
    wait_for,
    write_legacy_checkpoint,
)
from mpinn.base.errors import UsageError
from mpinn.nn.model import MLP, Architecture
from mpinn.run import checkpoint
from mpinn.run.checkpoint import Checkpoint, CorruptCheckpoint

ARGS = ["--hidden", "16", "--dtype", "float64", "--batch-size", 50, "--optimizer", "adam",
        "--seed", 4]


def state(run: Path) -> list[np.ndarray]:
    """Weights and optimizer state of a run's checkpoint."""
    ckpt = checkpoint.load(str(run / "checkpoint.h5"))
    return ckpt.weights + [ckpt.optimizer_state[k] for k in sorted(ckpt.optimizer_state)]


def assert_same(a: Path, b: Path) -> None:
    for x, y in zip(state(a), state(b), strict=True):
        np.testing.assert_array_equal(x, y)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_epochs_is_bit_identical(synth, tmp_path):
    ok(mpinn(2, "train", synth, "--out", tmp_path / "full", "--epochs", 3, *ARGS))
    ok(mpinn(2, "train", synth, "--out", tmp_path / "part", "--epochs", 1, *ARGS))
    resumed = ok(mpinn(2, "train", "--out", tmp_path / "part", "--resume", "--epochs", 3))
    assert "resumed from" in resumed.stdout and "epoch 2, step 0" in resumed.stdout
    assert_same(tmp_path / "full", tmp_path / "part")
    full, part = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    assert [(m["epoch"], m["train_loss"], m["test_loss"]) for m in full] == \
        [(m["epoch"], m["train_loss"], m["test_loss"]) for m in part]


@pytest.mark.parametrize("shuffle", ["global", "block"])
def test_resume_from_a_mid_epoch_checkpoint(synth, tmp_path, shuffle):
    """Continue from every few steps' checkpoint: same P -> bitwise; 2 -> 3 ranks -> 1e-12."""
    extra = ["--shuffle", shuffle, "--block-rows", 16, "--window-rows", 150]
    ok(mpinn(2, "train", synth, "--out", tmp_path / "full", "--epochs", 2, *ARGS, *extra,
             "--checkpoint-every", 5, "--keep-checkpoints", 100))
    history = sorted((tmp_path / "full" / "checkpoints").iterdir())
    mid = [p for p in history if checkpoint.load(str(p)).step_in_epoch][1]  # inside epoch 1
    assert checkpoint.load(str(mid)).step == 10
    ranks = (2, 3) if shuffle == "global" else (2,)  # block shuffle depends on P by design
    for n in ranks:
        run = tmp_path / f"resumed{n}"
        (run / "checkpoints").mkdir(parents=True)
        shutil.copy(tmp_path / "full" / "config.toml", run / "config.toml")
        shutil.copy(mid, run / "checkpoint.h5")
        result = ok(mpinn(n, "train", "--out", run, "--resume"))
        assert "epoch 1, step 10 of 12" in result.stdout
        if n == 2:
            assert_same(tmp_path / "full", run)
        else:
            for x, y in zip(state(tmp_path / "full")[:4], state(run)[:4], strict=True):
                assert np.linalg.norm(x - y) <= 1e-12 * np.linalg.norm(x)
        assert [m["epoch"] for m in metrics(run)] == [1, 2]


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_to_one_rank_checkpoints_all_and_resume_is_bit_identical(
        synth, tmp_path, signum):
    run = tmp_path / "run"
    args = [synth, "--out", run, "--epochs", 4, *ARGS, "--batch-size", 5]
    proc = start_mpinn(2, "train", *args)
    wait_for(lambda: (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text(),
             proc)
    pids = rank_pids(str(run))
    assert len(pids) == 2
    os.kill(random.choice(pids), signum)  # one rank only: all must agree and stop
    result = finish(proc, timeout=60)
    code, err = result.returncode, result.stderr
    assert code == 3, (result.stdout, err)
    assert err.count("stopped by a signal") == 1 and "Traceback" not in err
    stopped = checkpoint.load(str(run / "checkpoint.h5"))
    assert stopped.epoch < 4 and stopped.step > 120
    ok(mpinn(2, "train", "--out", run, "--resume"))
    ok(mpinn(2, "train", *args[:2], tmp_path / "reference", *args[3:]))
    assert_same(tmp_path / "reference", run)


def test_kill_9_during_checkpoint_writes_never_leaves_a_broken_checkpoint(synth, tmp_path):
    """Checkpoint every step (3 MB each), kill -9 the job at random moments, many times."""
    run = tmp_path / "run"
    args = [synth, "--out", run, "--epochs", 1000, "--hidden", "512,512", "--batch-size", 40,
            "--checkpoint-every", 1]
    rng = random.Random(0)
    last_step = -1
    for attempt in range(8):
        proc = start_mpinn(2, "train", *args, *(["--resume"] if attempt else []))
        wait_for(lambda: (run / "checkpoint.h5").exists(), proc)
        time.sleep(rng.uniform(0.05, 0.6))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        time.sleep(0.2)
        for pid in rank_pids(str(run)):  # nothing may survive a kill of the job
            os.kill(pid, signal.SIGKILL)
        ckpt = checkpoint.load(str(run / "checkpoint.h5"))  # loads: complete, not partial
        assert all(np.isfinite(w).all() for w in ckpt.weights)
        assert ckpt.step >= last_step  # never goes back
        last_step = ckpt.step
        for kept in (run / "checkpoints").glob("step-*.h5"):
            checkpoint.load(str(kept))
    assert last_step > 0


def test_incompatible_resume_is_refused(synth, digits, tmp_path):
    run = tmp_path / "run"
    ok(mpinn(2, "train", synth, "--out", run, "--epochs", 1, *ARGS))
    before = (run / "checkpoint.h5").read_bytes()
    for extra, words in ((["--hidden", "32"], "hidden"), (["--batch-size", "64"], "batch_size"),
                         (["--seed", "5"], "seed"), ([digits], "training data")):
        args = ["train", *extra[-1:]] if extra == [digits] else ["train"]
        result = mpinn(2, *args, "--out", run, "--resume", "--epochs", 2,
                       *(extra if extra != [digits] else []))
        text = result.stdout + result.stderr
        assert result.returncode == 2, text
        assert text.count("mpinn: error:") == 1 and "does not fit" in text and words in text
    assert (run / "checkpoint.h5").read_bytes() == before
    empty = mpinn(2, "train", synth, "--out", tmp_path / "none", "--resume")
    assert empty.returncode == 2 and "holds no run to resume" in empty.stderr
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("shuffle", ["global", "block"])
@pytest.mark.parametrize("io", ["independent", "mpio"])
def test_stop_while_prefetch_threads_read_ahead(io, shuffle, synth, parallel_env, tmp_path):
    """All ranks' prefetch (and window loader) threads make the same reads before stopping."""
    for stop_step in (3, 8):
        run_dir = tmp_path / f"{io}{stop_step}"
        result = parallel_env.script(2, "stop_while_prefetching.py", stop_step, "--", "train",
                                     synth, "--out", run_dir, "--io", io, "--hidden", "8",
                                     "--batch-size", 20, "--epochs", 3, "--shuffle", shuffle,
                                     "--block-rows", 16, "--window-rows", 60, timeout=120)
        assert result.returncode == 3, result.stdout + result.stderr
        counts = result.stdout.split("reads per rank: ")[1].splitlines()[0]
        assert len(set(json.loads(counts))) == 1, counts  # the same reads on every rank
        # signalled during step k: the flag rides in the Allreduce of step k + 1
        assert checkpoint.load(str(run_dir / "checkpoint.h5")).step == stop_step + 1


def test_overwrite_starts_a_clean_history(synth, tmp_path):
    run = tmp_path / "run"
    ok(mpinn(2, "train", synth, "--out", run, "--epochs", 3, *ARGS))
    ok(mpinn(2, "train", synth, "--out", run, "--epochs", 1, *ARGS, "--overwrite"))
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert steps == ["step-000000012.h5"]  # the new run's only checkpoint, nothing old
    assert [m["epoch"] for m in metrics(run)] == [1]
    assert checkpoint.load(str(run / "checkpoint.h5")).step == 12


def test_block_shuffle_resume_on_other_ranks_only_at_window_boundaries(synth, tmp_path):
    extra = ["--shuffle", "block", "--block-rows", 16, "--window-rows", 150,
             "--checkpoint-every", 1, "--keep-checkpoints", 100]
    ok(mpinn(2, "train", synth, "--out", tmp_path / "full", "--epochs", 1, *ARGS, *extra))
    history = {checkpoint.load(str(p)).step: p for p in (tmp_path / "full" / "checkpoints")
               .iterdir()}
    for step, allowed in ((4, False), (3, True)):  # windows of 150 // 50 = 3 steps
        run = tmp_path / f"at{step}"
        (run / "checkpoints").mkdir(parents=True)
        shutil.copy(tmp_path / "full" / "config.toml", run / "config.toml")
        shutil.copy(history[step], run / "checkpoint.h5")
        result = mpinn(3, "train", "--out", run, "--resume")
        if allowed:
            ok(result)
        else:
            assert result.returncode == 2 and "inside a block-shuffle window" in result.stderr


@pytest.mark.parametrize("io", ["independent", "mpio"])
def test_a_failed_read_ahead_ends_the_job(io, synth, parallel_env, tmp_path):
    result = parallel_env.script(2, "fail_read_ahead.py", "--", "train", synth, "--out",
                                 tmp_path / "run", "--io", io, "--hidden", "8", "--batch-size",
                                 20, "--shuffle", "block", "--block-rows", 16,
                                 "--window-rows", 60, "--epochs", 2, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr  # aborted, within the timeout
    assert not (tmp_path / "run" / "summary.json").exists()
    # (the failing rank prints the error before MPI_Abort, but Hydra may drop output
    # still in flight when it tears the job down, so the text is not asserted)


# ---- checkpoints that prove themselves ----------------------------------------------

@pytest.fixture
def sealed(tmp_path, monkeypatch) -> tuple[Path, Checkpoint]:
    """A checkpoint file of a small model with momentum state, and what was saved."""
    monkeypatch.setenv("MPINN_CACHE_DIR", str(tmp_path / "cache"))
    model = MLP(Architecture((5, 7, 3)), 1)
    model.init(np.random.default_rng(1))
    ckpt = Checkpoint(arch=model.arch, task="classification", epoch=2, step=17,
                      optimizer="momentum", optimizer_state={"velocity": model.params * 0.5},
                      epoch_sums=np.array([1.5, 3.0, 40.0]), data_shape=(40, 5, 3))
    path = tmp_path / "ckpt.h5"
    path.write_bytes(checkpoint.image(ckpt, model))
    return path, replace(ckpt, weights=[a.copy() for p in zip(model.W, model.b) for a in p])


def assert_loads_as(path: Path, saved: Checkpoint) -> None:
    got = checkpoint.load(str(path))
    for a, b in zip(got.weights + [got.optimizer_state["velocity"], got.epoch_sums],
                    saved.weights + [saved.optimizer_state["velocity"], saved.epoch_sums],
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert (got.arch, got.step, got.epoch, got.data_shape) == \
        (saved.arch, saved.step, saved.epoch, saved.data_shape)


@pytest.mark.fast
def test_a_checkpoint_is_refused_if_any_byte_after_its_header_changed(sealed, monkeypatch):
    path, saved = sealed
    original = path.read_bytes()
    assert original.startswith(b"mpinn-checkpoint-digest-1\nsha256 ")
    assert_loads_as(path, saved)
    # HDF5 must never see a refused file: opening one fails the test
    monkeypatch.setattr(checkpoint, "open_hdf5_image", lambda data: pytest.fail("parsed"))
    rng = random.Random(5)
    body = range(checkpoint.USERBLOCK, len(original))
    for pos in [body[0], body[-1], *rng.sample(body, 150)]:
        mutated = bytearray(original)
        mutated[pos] ^= 1 << rng.randrange(8)
        path.write_bytes(mutated)
        with pytest.raises(CorruptCheckpoint, match="digest does not match"):
            checkpoint.load(str(path))
    for data, words in ((original[:-1], "truncated"), (original + b"\0", "extended"),
                        (original.replace(b"length ", b"lenxth "), "header is damaged"),
                        (b"\0" * 64 + original[64:], "neither an mpinn digest header")):
        path.write_bytes(data)
        with pytest.raises(CorruptCheckpoint, match=words):
            checkpoint.load(str(path))


@pytest.mark.fast
def test_the_header_padding_is_not_checksummed_content(sealed):
    path, saved = sealed
    mutated = bytearray(path.read_bytes())
    mutated[checkpoint.USERBLOCK - 1] = 0x55  # the last byte of the userblock's padding
    path.write_bytes(mutated)
    assert_loads_as(path, saved)


def test_a_checkpoint_without_a_digest_loads_with_one_warning(sealed, tmp_path, capsys):
    path, saved = sealed
    legacy = tmp_path / "legacy.h5"
    write_legacy_checkpoint(path, legacy)
    assert_loads_as(legacy, saved)
    assert_loads_as(legacy, saved)
    err = capsys.readouterr().err
    assert err.count("mpinn: warning:") == 1 and "has no digest" in err, err
    # nothing proves it, so it goes through the structure probe: a truncated one is refused
    broken = tmp_path / "legacy-cut.h5"
    broken.write_bytes(legacy.read_bytes()[:3000])
    with pytest.raises(UsageError, match="not a readable HDF5 file"):
        checkpoint.load(str(broken))


def corrupt(path: Path, at: int = 3000) -> None:
    """Flip one bit in place (a hard link to the file sees it too)."""
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))


def test_resume_falls_back_to_the_newest_intact_checkpoint(synth, tmp_path):
    run = tmp_path / "run"
    args = [synth, "--out", run, "--epochs", 2, *ARGS, "--checkpoint-every", 5,
            "--keep-checkpoints", 3]
    ok(mpinn(2, "train", *args))
    ok(mpinn(2, "train", synth, "--out", tmp_path / "reference", *args[3:]))
    kept = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in kept] == ["step-000000015.h5", "step-000000020.h5",
                                      "step-000000024.h5"]
    corrupt(run / "checkpoint.h5")  # = step 24 (a hard link)
    expect_error(mpinn(2, "evaluate", run, synth), 2, "is corrupt", "digest does not match",
                 str(run / "checkpoints"))
    expect_error(mpinn(None, "predict", run, synth, tmp_path / "p.h5"), 2, "is corrupt")
    resumed = ok(mpinn(2, "train", "--out", run, "--resume"))
    assert resumed.stderr.count("mpinn: warning:") == 1, resumed.stderr
    assert f"resuming from {kept[1]} (step 20)" in resumed.stderr
    # steps 21..24 again, from step 20's state: the run's end, bit for bit
    assert_same(tmp_path / "reference", run)
    for path in kept[:2]:
        corrupt(path)
    corrupt(run / "checkpoint.h5")
    expect_error(mpinn(2, "train", "--out", run, "--resume", "--epochs", 3), 2,
                 "no checkpoint of", "step-000000015.h5", "step-000000020.h5", "--overwrite")
