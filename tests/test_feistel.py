"""--shuffle feistel: a permutation computed, not stored (data/feistel.py), its hold-out,
its lazy epoch plan, and training with it."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from conftest import load_weights, mpinn, ok
from mpinn.data.feistel import Feistel
from mpinn.data.sampler import Sampling, epoch_plan, holdout

fast = pytest.mark.fast


@fast
@pytest.mark.parametrize("n", [1, 2, 3, 1000, 10**6 + 3, 2**16, 2**16 + 1])
def test_every_order_is_a_permutation(n):
    for key in ((0, 0), (7, 3)):
        order = Feistel(n, key)(np.arange(n))
        assert np.array_equal(np.sort(order), np.arange(n))
    if n > 3:
        assert not np.array_equal(Feistel(n, (0, 0))(np.arange(n)),
                                  Feistel(n, (0, 1))(np.arange(n)))  # the key matters


@fast
def test_positions_are_uniform_by_a_seeded_chi_square():
    """Where row i lands, over 4000 keys, for n = 40 (and so 1600 cells of 100 expected
    each): Pearson's statistic within 5 standard deviations of its mean; and no row
    keeps its position more often than chance allows."""
    n, keys = 40, 4000
    counts = np.zeros((n, n))
    for key in range(keys):
        counts[np.arange(n), Feistel(n, (12345, key))(np.arange(n))] += 1
    expected = keys / n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    dof = (n - 1) ** 2
    assert abs(chi2 - dof) < 5 * np.sqrt(2 * dof), chi2
    assert np.diag(counts).max() < expected + 5 * np.sqrt(expected)


@fast
@pytest.mark.parametrize("n,fraction,batch,accumulate", [(10, 0.2, 3, 1), (1001, 0.1, 64, 1),
                                                         (600, 0.0, 50, 2), (37, 0.5, 4, 3)])
def test_the_plan_is_p_invariant_and_trains_each_row_once(n, fraction, batch, accumulate):
    held = holdout(5, n, fraction, "feistel")
    assert len(held) == round(fraction * n) and np.array_equal(held, np.unique(held))
    train = np.setdiff1d(np.arange(n), held)
    reference = None
    for size in (1, 2, 3, 4):
        plans = [epoch_plan(Sampling("feistel"), 5, 2, n, batch, r, size, accumulate,
                            held=len(held)) for r in range(size)]
        glued = [glue(plans, k, accumulate) for k in range(len(plans[0]))]
        assert [len(g) for g in glued] == list(plans[0].batch_rows[:])
        seen = np.concatenate(glued)
        assert np.array_equal(np.sort(seen), train)  # every training row once, none held
        reference = reference or glued
        assert all(np.array_equal(a, b) for a, b in zip(reference, glued, strict=True))


def glue(plans, k: int, accumulate: int) -> np.ndarray:
    """Global batch k from the ranks' steps: micro-batch by micro-batch, ranks in order
    (a rank's step is its share of every micro-batch, one after another)."""
    if accumulate == 1:
        return np.concatenate([p.steps[k] for p in plans])
    parts = [np.split(p.steps[k], np.cumsum(p.micro[k])[:-1]) for p in plans]
    assert all(len(p.micro[k]) == accumulate for p in plans)
    return np.concatenate([parts[r][m] for m in range(accumulate) for r in range(len(plans))])


@fast
def test_a_plan_of_a_billion_rows_takes_no_memory():
    tracemalloc.start()
    plan = epoch_plan(Sampling("feistel"), 1, 0, 10**9, 512, 3, 8, held=10**7)
    rows = plan.steps[len(plan) // 2]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(rows) == 64 and len(plan) == -(-(10**9 - 10**7) // 512)
    assert peak < 1 << 20, peak  # bytes: nothing of the order of n


def test_training_is_p_invariant_and_resumes_exactly(synth, tmp_path):
    args = ["--hidden", "8", "--batch-size", 50, "--dtype", "float64", "--lr", 0.05,
            "--shuffle", "feistel", "--val-fraction", 0.2, "--seed", 3]
    ok(mpinn(1, "train", synth, "--out", tmp_path / "p1", "--epochs", 2, *args))
    ok(mpinn(3, "train", synth, "--out", tmp_path / "p3", "--epochs", 2, *args))
    one, three = load_weights(tmp_path / "p1" / "checkpoint.h5"), \
        load_weights(tmp_path / "p3" / "checkpoint.h5")
    assert max(np.abs(a - b).max() / np.abs(a).max() for a, b in zip(one, three)) < 1e-12
    ok(mpinn(2, "train", synth, "--out", tmp_path / "r", "--epochs", 1, *args))
    ok(mpinn(2, "train", "--out", tmp_path / "r", "--resume", "--epochs", 2))
    ok(mpinn(2, "train", synth, "--out", tmp_path / "whole", "--epochs", 2, *args))
    for a, b in zip(load_weights(tmp_path / "r" / "checkpoint.h5"),
                    load_weights(tmp_path / "whole" / "checkpoint.h5")):
        assert np.array_equal(a, b)  # bitwise, same P


@fast
def test_bench_sampler_reports_the_plans_memory(cli, tmp_path):
    """bench sampler on a virtual million rows: the global plan holds the permutation
    (8 bytes a row and more), the feistel plan nothing of the kind."""
    import json
    got = {}
    for shuffle in ("global", "feistel"):
        out = tmp_path / f"{shuffle}.json"
        text = ok(cli("bench", "sampler", "--rows", 10**6, "--shuffle", shuffle, "--steps", 5,
                      "--val-fraction", 0.1, "--json", out)).stdout
        assert f"{shuffle} shuffle of 1,000,000 rows" in text
        got[shuffle] = json.loads(out.read_text())
    assert got["global"]["plan_memory_bytes_per_rank"] > 8 * 10**6
    assert got["feistel"]["plan_memory_bytes_per_rank"] < got["global"][
        "plan_memory_bytes_per_rank"] / 4
    assert got["feistel"]["steps_drawn"] == 5 and got["feistel"]["draw_s_per_step"] > 0
