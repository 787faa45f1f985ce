"""--shard-optimizer (ZeRO stage 1): each rank updates 1/P of the parameters with 1/P
of the optimizer state; the weights are those of the replicated update (float64,
1e-12) at P = 1..4, with clipping and the divergence guard; checkpoints keep the full
state, so a run resumes with sharding on or off and on another P."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from conftest import RANKS, expect_error, load_weights, mpinn, ok

ARGS = ("--hidden", "16,8", "--batch-size", 50, "--lr", 0.01, "--dtype", "float64",
        "--clip-norm", 0.5, "--seed", 4)


def state(run) -> dict[str, np.ndarray]:
    with h5py.File(run / "checkpoint.h5", "r") as f:
        return {k: f["optimizer"][k][...] for k in f["optimizer"]}


def close(a, b) -> float:
    return max(np.abs(x - y).max() / max(np.abs(x).max(), 1e-300) for x, y in zip(a, b))


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_sharded_and_replicated_updates_give_the_same_weights(synth, tmp_path, optimizer):
    ok(mpinn(1, "train", synth, "--out", tmp_path / "rep", "--epochs", 2, "--optimizer",
             optimizer, *ARGS))
    reference, saved = load_weights(tmp_path / "rep" / "checkpoint.h5"), state(tmp_path / "rep")
    for n in RANKS:
        out = tmp_path / f"shard{n}"
        ok(mpinn(n, "train", synth, "--out", out, "--epochs", 2, "--optimizer", optimizer,
                 "--shard-optimizer", *ARGS))
        assert close(reference, load_weights(out / "checkpoint.h5")) < 1e-12, n
        import json
        phases = json.loads((out / "summary.json").read_text())["step_time_s"]
        assert phases["allgather"]["max"] > 0 and phases["update"]["max"] > 0
        got = state(out)  # the checkpoint holds the full state, gathered on rank 0
        assert set(got) == set(saved)
        assert all(got[k].shape == saved[k].shape and close([saved[k]], [got[k]]) < 1e-12
                   for k in saved), n


def test_resume_across_sharding_and_rank_counts(synth, tmp_path):
    opts = ("--optimizer", "adam", *ARGS)
    ok(mpinn(1, "train", synth, "--out", tmp_path / "whole", "--epochs", 3, *opts))
    whole = load_weights(tmp_path / "whole" / "checkpoint.h5")
    ok(mpinn(2, "train", synth, "--out", tmp_path / "a", "--epochs", 1, "--shard-optimizer",
             *opts))
    ok(mpinn(3, "train", "--out", tmp_path / "a", "--resume", "--epochs", 2,
             "--no-shard-optimizer"))
    ok(mpinn(4, "train", "--out", tmp_path / "a", "--resume", "--epochs", 3,
             "--shard-optimizer"))
    assert close(whole, load_weights(tmp_path / "a" / "checkpoint.h5")) < 1e-12
    assert close([state(tmp_path / "whole")["m"]], [state(tmp_path / "a")["m"]]) < 1e-12


def test_the_divergence_guard_and_refusals(synth, tmp_path):
    result = mpinn(3, "train", synth, "--out", tmp_path / "d", "--lr", "1e6", "--hidden", "16",
                   "--epochs", 50, "--shard-optimizer")
    expect_error(result, 1, "training diverged at epoch", "Likely cause: the learning rate")
    expect_error(mpinn(2, "train", synth, "--out", tmp_path / "r", "--shard-optimizer",
                       "--shuffle", "blocks"), 2, "did you mean block?")


def test_sharded_with_a_half_precision_sync(synth, tmp_path):
    """--shard-optimizer with --sync-dtype float16: each owner's slice from the all-to-all
    of rounded values (tests/mpi/wire_sync.py checks its bits); it trains like the
    float32 sync, and sends less than the float32 reduce-scatter and all-gather."""
    opts = ("--hidden", "16", "--batch-size", 64, "--lr", 0.05, "--optimizer", "momentum",
            "--epochs", 3, "--shard-optimizer")
    ok(mpinn(3, "train", synth, "--out", tmp_path / "f32", *opts))
    ok(mpinn(3, "train", synth, "--out", tmp_path / "f16", "--sync-dtype", "float16", *opts))
    import json
    s32, s16 = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("f32", "f16"))
    assert abs(s16["test_loss"] - s32["test_loss"]) < 0.02
    assert s16["sync_sent_bytes_per_step"] < 0.8 * s32["sync_sent_bytes_per_step"]


def test_bitwise_at_two_ranks_without_clipping(synth, tmp_path):
    """A sum of two is order-free: the reduce-scatter gives the Allreduce's bits."""
    opts = ("--hidden", "16,8", "--batch-size", 50, "--lr", 0.01, "--optimizer", "adam",
            "--dtype", "float64", "--epochs", 2)
    ok(mpinn(2, "train", synth, "--out", tmp_path / "rep", *opts))
    ok(mpinn(2, "train", synth, "--out", tmp_path / "shard", "--shard-optimizer", *opts))
    for a, b in zip(load_weights(tmp_path / "rep" / "checkpoint.h5"),
                    load_weights(tmp_path / "shard" / "checkpoint.h5")):
        assert np.array_equal(a, b)
