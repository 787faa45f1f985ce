"""Issue 9 under real mpiexec: dropout, clipping, L1, schedules and gradient
accumulation keep the data-parallel invariant (oracle: the 1-rank run, and the
un-accumulated batch), and a resume with them is exact."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
from test_checkpoint import assert_same, metrics
from test_parallel import train_args

from conftest import RANKS, expect_error, load_weights, mpinn, ok
from mpinn.run import checkpoint


def flat(run) -> np.ndarray:
    return np.concatenate([w.ravel() for w in load_weights(run / "checkpoint.h5")])


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


FEATURES = {
    "dropout": ("--dropout", "0.3,0.1"),
    "clip-norm": ("--clip-norm", 0.05),
    "l1": ("--l1", 0.01),
    "step-warmup": ("--lr-schedule", "step", "--lr-step-every", 5, "--lr-gamma", 0.5,
                    "--warmup-steps", 4),
    "cosine-warmup": ("--lr-schedule", "cosine", "--warmup-steps", 6, "--lr-min", 0.001),
    "all-together": ("--dropout", 0.2, "--l1", 1e-3, "--clip-norm", 0.5, "--lr-schedule",
                     "cosine", "--warmup-steps", 5, "--accumulate", 3, "--val-fraction", 0.2,
                     "--early-stopping", 5),
}


@pytest.mark.parametrize("name", FEATURES)
def test_weights_independent_of_rank_count(synth, tmp_path, name):
    """P = 2, 3, 4 against P = 1 within 1e-12, and the feature changed the result."""
    weights = {}
    for n in RANKS:
        ok(mpinn(n, *train_args(synth, tmp_path / f"p{n}", *FEATURES[name]), timeout=120))
        weights[n] = flat(tmp_path / f"p{n}")
    for n in RANKS[1:]:
        assert rel(weights[n], weights[1]) <= 1e-12, (name, n, rel(weights[n], weights[1]))
    ok(mpinn(1, *train_args(synth, tmp_path / "plain")))
    assert rel(flat(tmp_path / "plain"), weights[1]) > 1e-4, name  # it did something


def test_accumulation_equals_the_large_batch(synth, tmp_path):
    """--accumulate 4 (micro-batches 13, 13, 12, 12 of 50) equals one batch of 50, at P = 2
    and against P = 1; with dropout, whose masks do not depend on the split either."""
    extra = ("--dropout", 0.2)
    runs = {(1, 1): None, (2, 1): None, (2, 4): None, (1, 4): None, (3, 4): None}
    for n, k in runs:
        out = tmp_path / f"p{n}k{k}"
        result = ok(mpinn(n, *train_args(synth, out, *extra, "--accumulate", k)))
        runs[n, k] = flat(out)
        if k == 4:
            assert "4 micro-batches per update" in result.stdout
            assert f"in micro-batches of <= {-(-13 // n)})" in result.stdout  # model buffers
    for key in ((2, 1), (2, 4), (1, 4), (3, 4)):
        assert rel(runs[key], runs[1, 1]) <= 1e-12, (key, rel(runs[key], runs[1, 1]))


COSINE = ("--lr-schedule", "cosine", "--warmup-steps", 3, "--lr-min", 0.002, "--dropout", 0.25)


def mid_run(tmp_path, full, step: int, name: str):
    """A new run directory holding `full`'s checkpoint of global step `step`."""
    mid = next(p for p in sorted((full / "checkpoints").iterdir())
               if checkpoint.load(str(p)).step == step)
    run = tmp_path / name
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "config.toml", run / "config.toml")
    shutil.copy(mid, run / "checkpoint.h5")
    return run


@pytest.mark.parametrize("extra,step", [((), 10), (("--val-fraction", 0.2, "--early-stopping",
                                                     5, "--accumulate", 2), 15)])
def test_resume_with_dropout_and_cosine_is_bit_identical(synth, tmp_path, extra, step):
    """Mid-epoch; also with validation, early stopping's count and accumulation."""
    full = tmp_path / "full"
    ok(mpinn(2, *train_args(synth, full, *COSINE, *extra, "--checkpoint-every", 5,
                            "--keep-checkpoints", 100)))
    run = mid_run(tmp_path, full, step, "resumed")
    result = ok(mpinn(2, "train", "--out", run, "--resume"))
    assert "stretched" not in result.stdout
    assert_same(full, run)
    resumed = [m["lr"] for m in metrics(run)]  # the epochs the resumed run finished
    assert resumed and resumed == [m["lr"] for m in metrics(full)][-len(resumed):]
    assert metrics(run)[-1]["val_loss"] == metrics(full)[-1]["val_loss"]  # None without
    assert metrics(full)[-1]["lr"] == pytest.approx(0.002, rel=1e-12)  # cosine's end


def test_a_longer_resume_stretches_cosine(synth, tmp_path):
    """Resumed at step 10 of 24 with --epochs 4 (48 steps): the rate goes on from the
    rate of step 10 and reaches lr_min at step 48; a later resume keeps the stretch."""
    full = tmp_path / "full"
    ok(mpinn(1, *train_args(synth, full, *COSINE, "--checkpoint-every", 5,
                            "--keep-checkpoints", 100)))
    run = mid_run(tmp_path, full, 10, "longer")
    result = ok(mpinn(1, "train", "--out", run, "--resume", "--epochs", 4,
                      "--checkpoint-every", 5, "--keep-checkpoints", 100))
    r10 = 0.002 + (0.05 - 0.002) * 0.5 * (1 + math.cos(math.pi * 7 / 20))  # the old plan
    assert f"stretched at resume: from {r10:.6g} at step 11" in result.stdout
    lrs = [m["lr"] for m in metrics(run)]
    last_of_epoch1 = 0.002 + (r10 - 0.002) * 0.5 * (1 + math.cos(math.pi * 1 / 37))
    assert lrs[0] == pytest.approx(last_of_epoch1, rel=1e-12)
    assert lrs[-1] == pytest.approx(0.002, rel=1e-12) and len(lrs) == 4
    again = mid_run(tmp_path, run, 30, "again")  # resume the stretched run at step 30
    ok(mpinn(1, "train", "--out", again, "--resume"))
    assert_same(run, again)


def test_extending_a_finished_cosine_at_rate_zero_is_refused(synth, tmp_path):
    """More epochs after cosine reached --lr-min 0 would not change the model: exit 2
    with the way out, which then works."""
    run = tmp_path / "done"
    ok(mpinn(1, *train_args(synth, run, "--lr-schedule", "cosine")))
    expect_error(mpinn(2, "train", "--out", run, "--resume", "--epochs", 3), 2,
                 "reached a rate of 0", "--lr-min R > 0")
    result = ok(mpinn(2, "train", "--out", run, "--resume", "--epochs", 3, "--lr-min", 0.01))
    assert "stretched at resume: from 0.01" in result.stdout
