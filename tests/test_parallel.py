"""The data-parallel invariant, run with real mpiexec at several rank counts.

Oracle: the 1-rank run. P ranks must end with the same weights up to the order
of floating-point summation (docs/design.md, section 1).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import RANKS, load_weights, mpi_script, mpinn, ok


@pytest.mark.parametrize("n", RANKS + (5,))
def test_collectives_and_sampler(n):
    result = ok(mpi_script(n, "collectives.py", timeout=60))
    assert f"collectives ok on {n} ranks" in result.stdout


@pytest.mark.parametrize("n,sync", [(2, "blocking"), (3, "blocking"), (2, "overlap"),
                                    (3, "overlap")])
def test_the_gradient_buckets_tile_one_buffer_every_step(n, sync, synth, tmp_path):
    result = ok(mpi_script(n, "count_allreduce.py", synth, tmp_path / "run", 64, 2, sync,
                           timeout=90))
    steps = 2 * -(-600 // 64)
    found = re.search(rf"allreduce ok: {steps} steps, (\d+) gradient Allreduces each",
                      result.stdout)
    assert found, result.stdout
    # blocking: the whole buffer at once; overlap: 16,8 hidden (1.5 kB) in 400 B buckets
    assert int(found.group(1)) == (1 if sync == "blocking" else 2)


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


def flat_weights(run: Path) -> np.ndarray:
    return np.concatenate([w.ravel() for w in load_weights(run / "checkpoint.h5")])


@pytest.mark.parametrize("n", RANKS)
def test_overlapped_and_blocking_sync_agree(n, synth, tmp_path):
    """The same panels; the sums sent in buckets while backward runs (of 1 kB at least),
    or at once after it: within 1e-12 in float64, bitwise at P <= 2 (a sum of two
    numbers does not depend on their order)."""
    for mode, extra in (("blocking", ()), ("overlap", ("--bucket-mb", "0.001"))):
        ok(mpinn(n, *train_args(synth, tmp_path / mode, "--sync", mode, *extra)))
    blocking, overlap = flat_weights(tmp_path / "blocking"), flat_weights(tmp_path / "overlap")
    if n <= 2:
        assert np.array_equal(overlap, blocking)
    else:
        assert np.linalg.norm(overlap - blocking) <= 1e-12 * np.linalg.norm(blocking)


def test_resume_across_bucket_sizes_is_bitwise_at_two_ranks(synth, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    ok(mpinn(2, *train_args(synth, straight, "--bucket-mb", "0.001")))
    ok(mpinn(2, *train_args(synth, split, "--bucket-mb", "0.001"), "--epochs", 1))
    ok(mpinn(2, "train", "--out", split, "--resume", "--epochs", 2, "--bucket-mb", 1))
    assert np.array_equal(flat_weights(split), flat_weights(straight))


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
