"""--val-fraction and --early-stopping, with real mpiexec: the held-out rows' scores
against a NumPy oracle, P-invariance against the 1-rank run, early stopping and its
exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import RANKS, expect_error, load_weights, mpinn, ok, strict_json_lines
from mpinn.run import checkpoint

PARALLEL = ["--hidden", "16,8", "--dtype", "float64", "--batch-size", 50, "--epochs", 2,
            "--optimizer", "momentum", "--lr", 0.05, "--seed", 7, "--val-fraction", 0.2]
# overfits the 300 training rows left of synth's 600: the validation loss is lowest
# after epoch 4, then rises clearly (by > 0.05 each epoch), so patience 3 ends epoch 7
EARLY = ["--hidden", "64,64", "--dtype", "float64", "--batch-size", 50, "--epochs", 30,
         "--optimizer", "adam", "--lr", 0.05, "--seed", 7, "--val-fraction", 0.5,
         "--early-stopping", 3, "--keep-checkpoints", 100]
TIMING = ("seconds", "samples_per_s")


def held_out(seed: int, n: int, fraction: float) -> np.ndarray:
    """The documented hold-out (sampler.holdout), written out independently."""
    return np.sort(np.random.default_rng([seed, 0x7A11]).permutation(n)[:round(fraction * n)])


def oracle_scores(weights: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mean softmax cross-entropy and accuracy of a ReLU MLP, in plain NumPy."""
    a = x.astype(np.float64)
    for i in range(0, len(weights), 2):
        a = a @ weights[i] + weights[i + 1]
        if i + 2 < len(weights):
            a = np.maximum(a, 0)
    shifted = a - a.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean()), float((a.argmax(axis=1) == y).mean())


def weights_and_state(path: Path) -> list[np.ndarray]:
    ckpt = checkpoint.load(str(path))
    return ckpt.weights + [ckpt.optimizer_state[k] for k in sorted(ckpt.optimizer_state)]


def without_timing(run: Path) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING}
            for m in strict_json_lines(run / "metrics.jsonl")]


def test_validation_is_independent_of_rank_count(synth, tmp_path):
    """P = 1..4: the same held-out rows, weights and val losses as one rank, to 1e-12."""
    flat, val = {}, {}
    for n in RANKS:
        out = tmp_path / f"p{n}"
        ok(mpinn(n, "train", synth, "--out", out, *PARALLEL, timeout=120))
        flat[n] = np.concatenate([w.ravel() for w in load_weights(out / "checkpoint.h5")])
        val[n] = np.array([m["val_loss"] for m in strict_json_lines(out / "metrics.jsonl")])
        summary = json.loads((out / "summary.json").read_text())
        assert summary["val_rows"] == 120 and summary["steps"] == 2 * -(-480 // 50)
    for n in RANKS[1:]:
        assert np.linalg.norm(flat[n] - flat[1]) <= 1e-12 * np.linalg.norm(flat[1]), n
        np.testing.assert_allclose(val[n], val[1], rtol=1e-12)


def test_val_scores_equal_a_numpy_oracle_on_the_held_out_rows(synth, tmp_path):
    out = tmp_path / "run"
    ok(mpinn(3, "train", synth, "--out", out, *PARALLEL))
    last = strict_json_lines(out / "metrics.jsonl")[-1]
    with h5py.File(synth, "r") as f:
        rows = held_out(7, f["train/y"].shape[0], 0.2)
        x, y = f["train/x"][...][rows], f["train/y"][...][rows]
    loss, accuracy = oracle_scores(load_weights(out / "checkpoint.h5"), x, y)
    assert last["val_loss"] == pytest.approx(loss, rel=1e-6)
    assert last["val_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    # and the test split's scores are not what was reported as validation
    assert last["test_loss"] != pytest.approx(loss, rel=1e-3)


def test_evaluate_split_val_scores_the_held_out_rows_alike_at_any_rank_count(synth, tmp_path):
    """`mpinn evaluate --split val` at 1 and 2 ranks: the rows the run held out, scored
    as training scored them (its last val_*), and as a NumPy oracle does."""
    out = tmp_path / "run"
    ok(mpinn(2, "train", synth, "--out", out, *PARALLEL))
    last = strict_json_lines(out / "metrics.jsonl")[-1]
    got = {n: json.loads(ok(mpinn(n, "evaluate", out / "checkpoint.h5", synth, "--split", "val",
                                  "--json", "-")).stdout) for n in (1, 2)}
    assert got[1]["ranks"] == 1 and got[2]["ranks"] == 2
    assert got[2]["confusion"] == got[1]["confusion"] and got[2]["rows"] == got[1]["rows"] == 120
    assert got[2]["loss"] == pytest.approx(got[1]["loss"], rel=1e-12)
    assert got[1]["loss"] == pytest.approx(last["val_loss"], rel=1e-12)
    assert got[1]["accuracy"] == last["val_accuracy"]
    with h5py.File(synth, "r") as f:
        rows = held_out(7, f["train/y"].shape[0], 0.2)
        x, y = f["train/x"][...][rows], f["train/y"][...][rows]
    loss, accuracy = oracle_scores(load_weights(out / "checkpoint.h5"), x, y)
    assert got[2]["loss"] == pytest.approx(loss, rel=1e-12)
    assert got[2]["accuracy"] == pytest.approx(accuracy, abs=1e-12)


def expected_stop(val_losses: list[float], patience: int) -> tuple[int, int]:
    """(best epoch, the epoch that ends the run) for a sequence of validation losses."""
    best, best_epoch, stale = float("inf"), 0, 0
    for epoch, loss in enumerate(val_losses, 1):
        best, best_epoch, stale = (loss, epoch, 0) if loss < best else (best, best_epoch,
                                                                         stale + 1)
        if stale == patience:
            return best_epoch, epoch
    raise AssertionError(f"no stop in {val_losses}")


@pytest.fixture(scope="module")
def stopped(synth, tmp_path_factory) -> Path:
    """A run that stops early, at 2 ranks."""
    out = tmp_path_factory.mktemp("early") / "full"
    result = ok(mpinn(2, "train", synth, "--out", out, *EARLY, timeout=180))
    assert "early stopping after epoch" in result.stdout
    return out


def test_early_stopping_ends_normally_and_keeps_the_best_epoch(stopped, synth):
    records = strict_json_lines(stopped / "metrics.jsonl")
    best_epoch, last = expected_stop([m["val_loss"] for m in records], 3)
    assert len(records) == last < 30
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["stopped_early"] is True and summary["stopped_epoch"] == last
    assert summary["best_epoch"] == best_epoch
    assert summary["best_val_loss"] == records[best_epoch - 1]["val_loss"]
    assert summary["test_loss"] == records[-1]["test_loss"]  # the final model's
    # best.h5 is the checkpoint of the best epoch, byte for byte
    steps = records[best_epoch - 1]["step"]
    kept = stopped / "checkpoints" / f"step-{steps:09d}.h5"
    assert (stopped / "best.h5").read_bytes() == kept.read_bytes()
    best = checkpoint.load(str(stopped / "best.h5"))
    assert best.epoch == best_epoch and best.best_epoch == best_epoch and best.stale_epochs == 0
    final = checkpoint.load(str(stopped / "checkpoint.h5"))
    assert final.stale_epochs == 3 and final.best_val_loss == summary["best_val_loss"]
    evaluated = ok(mpinn(2, "evaluate", stopped / "best.h5", synth))
    assert f"loss {records[best_epoch - 1]['test_loss']:.6f}" in evaluated.stdout
    # resuming a run that stopped early has nothing left to do
    again = ok(mpinn(1, "train", "--out", stopped, "--resume", "--epochs", 30))
    assert "nothing to do" in again.stdout


def test_resume_continues_the_patience_count_bit_identically(stopped, synth, tmp_path):
    records = strict_json_lines(stopped / "metrics.jsonl")
    best_epoch, _ = expected_stop([m["val_loss"] for m in records], 3)
    k = best_epoch + 1  # the first epoch after the best: the count stands at 1
    part = tmp_path / "part"
    ok(mpinn(2, "train", synth, "--out", part, *EARLY, "--epochs", k, timeout=180))
    assert checkpoint.load(str(part / "checkpoint.h5")).stale_epochs == 1
    ok(mpinn(2, "train", "--out", part, "--resume", "--epochs", 30, timeout=180))
    for name in ("checkpoint.h5", "best.h5"):
        for a, b in zip(weights_and_state(stopped / name), weights_and_state(part / name),
                        strict=True):
            np.testing.assert_array_equal(a, b)
    assert without_timing(part) == without_timing(stopped)
    summaries = [json.loads((run / "summary.json").read_text()) for run in (stopped, part)]
    keys = ("stopped_early", "stopped_epoch", "best_epoch", "best_val_loss", "test_loss")
    assert [summaries[1][k] for k in keys] == [summaries[0][k] for k in keys]
    assert summaries[1]["resumed_from_step"] == records[k - 1]["step"]


def test_wrong_validation_settings_are_refused(synth, tmp_path):
    expect_error(mpinn(2, "train", synth, "--out", tmp_path / "b", "--val-fraction", 0.2,
                       "--shuffle", "block"), 2,
                 "--val-fraction (val_fraction) cannot be used with --shuffle (shuffle) block")
    ok(mpinn(1, "train", synth, "--out", tmp_path / "r", "--epochs", 1, "--val-fraction", 0.2))
    expect_error(mpinn(1, "train", "--out", tmp_path / "r", "--resume", "--epochs", 2,
                       "--val-fraction", 0.3), 2, "--val-fraction (val_fraction) 0.2 -> 0.3")
    expect_error(mpinn(1, "train", synth, "--out", tmp_path / "t", "--val-fraction", 0.0001),
                 2, "--val-fraction (val_fraction) 0.0001 of 600 training rows holds out no row")


def test_a_stopped_run_says_how_to_train_on(stopped):
    """--epochs cannot extend a run whose patience ran out: the message says what can."""
    result = ok(mpinn(1, "train", "--out", stopped, "--resume", "--epochs", 40))
    assert "is complete" in result.stdout and "--resume --early-stopping N" in result.stdout


def test_best_h5_is_kept_with_validation_alone(synth, tmp_path):
    """Held-out rows without early stopping still keep the best epoch's model."""
    out = tmp_path / "v"
    ok(mpinn(1, "train", synth, "--out", out, "--hidden", "8", "--epochs", 2,
             "--val-fraction", 0.2))
    best = checkpoint.load(str(out / "best.h5"))
    assert best.epoch == best.best_epoch >= 1


def test_a_checkpoint_from_before_the_toolkit_resumes(synth, tmp_path):
    """A configuration without the toolkit's keys (mpinn before them) means their
    defaults: it fits a configuration that leaves them at their defaults."""
    from mpinn.run.resolve import resolve, to_toml
    from mpinn.train.resume import check_compatible
    cfg = resolve({}, {"data": str(synth), "out": str(tmp_path / "r"), "hidden": "8"})
    old = "\n".join(line for line in to_toml(cfg).splitlines()
                    if not line.startswith(("dropout", "val_fraction")))
    ckpt = checkpoint.Checkpoint(arch=object(), task="classification", config=old,
                                 data_shape=(600, 12, 4))
    check_compatible(ckpt, cfg, ckpt.arch, (600, 12, 4), 1)  # no UsageError
