"""The data-parallel invariant, run with real mpiexec at several rank counts.

Oracle: the 1-rank run. P ranks must end with the same weights up to the order
of floating-point summation (docs/design.md, section 1).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import RANKS, load_weights, mpi_script, mpinn, ok


@pytest.mark.parametrize("n", RANKS + (5,))
def test_collectives_and_sampler(n):
    result = ok(mpi_script(n, "collectives.py", timeout=60))
    assert f"collectives ok on {n} ranks" in result.stdout


@pytest.mark.parametrize("n", (2, 3))
def test_one_gradient_allreduce_per_step_on_one_buffer(n, synth, tmp_path):
    result = ok(mpi_script(n, "count_allreduce.py", synth, tmp_path / "run", 64, 2, timeout=90))
    steps = 2 * -(-600 // 64)
    assert f"allreduce ok: {steps} steps, {steps} gradient Allreduces" in result.stdout


def train_args(data, out, *extra):
    return ["train", data, "--out", out, "--hidden", "16,8", "--dtype", "float64",
            "--batch-size", 50, "--epochs", 2, "--optimizer", "momentum", "--lr", 0.05,
            "--seed", 7, *extra]


@pytest.mark.parametrize("extra", [(), ("--no-shuffle",), ("--optimizer", "adam",
                                                            "--activation", "tanh")])
def test_weights_independent_of_rank_count(synth, tmp_path, extra):
    """P = 1..4, global batch 50 (3 does not divide it), 2 epochs: weights agree to 1e-12."""
    weights, summaries = {}, {}
    for n in RANKS:
        out = tmp_path / f"p{n}"
        ok(mpinn(n, *train_args(synth, out, *extra), timeout=120))
        weights[n] = load_weights(out / "checkpoint.h5")
        summaries[n] = json.loads((out / "summary.json").read_text())
    reference = np.concatenate([w.ravel() for w in weights[1]])
    init_dist = None
    for n in RANKS[1:]:
        flat = np.concatenate([w.ravel() for w in weights[n]])
        rel = np.linalg.norm(flat - reference) / np.linalg.norm(reference)
        assert rel <= 1e-12, (n, rel)
        assert summaries[n]["ranks"] == n
        assert summaries[n]["final_train_loss"] == pytest.approx(
            summaries[1]["final_train_loss"], rel=1e-10)
        init_dist = rel
    assert init_dist is not None
    # the runs really trained: the weights moved far from where they started
    init = tmp_path / "init"
    ok(mpinn(1, *train_args(synth, init, *extra), "--epochs", 0))  # the last flag wins
    start = np.concatenate([w.ravel() for w in load_weights(init / "checkpoint.h5")])
    assert np.linalg.norm(reference - start) / np.linalg.norm(start) > 1e-2


def test_more_ranks_than_samples_in_a_batch(synth, tmp_path):
    """Batch 3 on 4 ranks: one rank has an empty share every step and still takes part."""
    out1, out4 = tmp_path / "p1", tmp_path / "p4"
    args = ["--batch-size", 3, "--epochs", 1, "--dtype", "float64", "--hidden", "8", "--lr", 0.01]
    ok(mpinn(1, "train", synth, "--out", out1, *args))
    ok(mpinn(4, "train", synth, "--out", out4, *args))
    for a, b in zip(load_weights(out1 / "checkpoint.h5"), load_weights(out4 / "checkpoint.h5")):
        np.testing.assert_allclose(b, a, rtol=1e-11, atol=1e-13)


def test_digits_two_ranks_reach_95_percent(digits, tmp_path):
    out = tmp_path / "digits"
    config = Path(__file__).resolve().parent.parent / "jobs" / "digits.toml"  # make demo's
    result = ok(mpinn(2, "train", digits, "--config", config, "--out", out, timeout=180))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.95, summary
    assert summary["ranks"] == 2 and summary["epochs"] == 30
    assert result.stdout.count("epoch 30/30") == 1  # logged once, by rank 0
    # the distributed evaluation of the checkpoint agrees with the training run's
    evaluated = ok(mpinn(2, "evaluate", out / "checkpoint.h5", digits))
    assert f"accuracy {summary['test_accuracy']:.4f}" in evaluated.stdout
