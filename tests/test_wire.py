"""The half-precision gradient sync (--sync-dtype float16|bfloat16): its arithmetic
against a NumPy model at P = 1..4 (tests/mpi/wire_sync.py), error feedback, overflow,
training, resume, and what the run records."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from conftest import RANKS, expect_error, load_weights, mpi_script, mpinn, ok

CASES = [(n, "float16", "overlap", "") for n in RANKS] + [
    (2, "float16", "blocking", ""), (3, "bfloat16", "overlap", ""),
    (2, "bfloat16", "blocking", ""),
    # with --shard-optimizer: the owners' slices, one rounding
    (2, "float16", "overlap", "shard"), (4, "float16", "overlap", "shard"),
    (3, "bfloat16", "blocking", "shard")]


@pytest.mark.parametrize("n,wire,mode,shard", CASES)
def test_sync_is_the_numpy_model_of_its_arithmetic(n, wire, mode, shard):
    """Bit for bit, every step, every rank: the reduced buckets (sharded: each owner's
    slice) and the residuals; the applied sums plus the residuals equal the float32
    sums; an overflow skips the step on all ranks and halves the scale, keeping every
    rank's whole v."""
    out = ok(mpi_script(n, "wire_sync.py", wire, mode, *([shard] if shard else []))).stdout
    assert f"ok {wire} {mode}{' shard' if shard else ''} P={n}" in out


def train(n, data, out, *extra):
    return mpinn(n, "train", data, "--out", out, "--hidden", "16", "--epochs", 3,
                 "--batch-size", 64, "--lr", 0.05, "--optimizer", "momentum", *extra,
                 timeout=240)


def test_training_with_float16_sync_converges_like_float32(synth, tmp_path):
    ok(train(2, synth, tmp_path / "f32"))
    ok(train(2, synth, tmp_path / "f16", "--sync-dtype", "float16"))
    s32 = json.loads((tmp_path / "f32" / "summary.json").read_text())
    s16 = json.loads((tmp_path / "f16" / "summary.json").read_text())
    assert s16["sync_dtype"] == "float16" and s32["sync_dtype"] == "model"
    assert s16["sync_sent_bytes_per_step"] < 0.55 * s32["sync_sent_bytes_per_step"]
    assert s16["test_accuracy"] > 0.5 and abs(s16["test_loss"] - s32["test_loss"]) < 0.02
    w32, w16 = load_weights(tmp_path / "f32" / "checkpoint.h5"), \
        load_weights(tmp_path / "f16" / "checkpoint.h5")
    drift = max(np.abs(a - b).max() / np.abs(a).max() for a, b in zip(w32, w16))
    assert 0 < drift < 2e-2  # not the float32 run (P-dependent roundings), close to it


def test_overflow_skips_steps_and_the_run_goes_on(tmp_path):
    """Inputs of 3e4 make gradient sums beyond float16's range at scale 1: the first
    steps overflow, are skipped on every rank (no divergence), and the scale halves
    until the sums fit."""
    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "big.h5", "w") as f:
        for split, n in (("train", 512), ("test", 64)):
            x = (rng.standard_normal((n, 8)) * 3e4).astype(np.float32)
            f[f"{split}/x"], f[f"{split}/y"] = x, (x[:, 0] > 0).astype(np.int32)
    result = ok(mpinn(2, "train", tmp_path / "big.h5", "--out", tmp_path / "run",
                      "--epochs", 2, "--batch-size", 128, "--hidden", "8", "--lr", 1e-6,
                      "--sync-dtype", "float16", timeout=180))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["sync_overflows"] >= 1 and summary["steps"] == 8
    assert summary["sync_scale"] < 1 and "diverged" not in result.stderr


def test_resume_on_the_same_and_another_number_of_ranks(synth, tmp_path):
    """The checkpoint keeps the sum of the residuals (on rank 0 after a resume) and the
    scale: a resumed run follows the uninterrupted one closely (not bitwise: the
    residuals sit on other ranks) on 2 and on 3 ranks."""
    ok(train(2, synth, tmp_path / "whole", "--sync-dtype", "float16"))
    whole = load_weights(tmp_path / "whole" / "checkpoint.h5")
    with h5py.File(tmp_path / "whole" / "checkpoint.h5", "r") as f:
        assert f["optimizer/sync_residual"].shape == f["optimizer/velocity"].shape
        assert f["optimizer/sync_scale"][0] > 0
    for n in (2, 3):
        out = tmp_path / f"resumed{n}"
        ok(mpinn(2, "train", synth, "--out", out, "--hidden", "16", "--epochs", 1,
                 "--batch-size", 64, "--lr", 0.05, "--optimizer", "momentum",
                 "--sync-dtype", "float16", timeout=180))
        ok(mpinn(n, "train", "--out", out, "--resume", "--epochs", 3, timeout=180))
        got = load_weights(out / "checkpoint.h5")
        drift = max(np.abs(a - b).max() / np.abs(a).max() for a, b in zip(whole, got))
        assert drift < 1e-2, (n, drift)
    expect_error(mpinn(2, "train", "--out", tmp_path / "resumed2", "--resume", "--epochs", 4,
                       "--sync-dtype", "bfloat16", timeout=120), 2,
                 "--sync-dtype (sync_dtype) 'float16' -> 'bfloat16'")
