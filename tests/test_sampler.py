"""The sampler's block stream against a materialised oracle (serial, no MPI)."""

from __future__ import annotations

import numpy as np
import pytest

from mpinn.data.sampler import BlockStream


@pytest.mark.parametrize("n,k", [(1, 1), (10, 3), (1000, 7), (1024, 1024), (5000, 64)])
def test_block_stream_rows_equal_the_materialised_stream(n, k):
    stream = BlockStream(n, k, np.random.default_rng(n + k))
    oracle = (stream.perm[:, None] * k + np.arange(k)).ravel()
    oracle = oracle[oracle < n]  # blocks in permuted order; the file's last block is short
    assert np.array_equal(np.sort(oracle), np.arange(n))
    rng = np.random.default_rng(0)
    for _ in range(50):
        a, b = sorted(rng.integers(0, n + 1, 2))
        np.testing.assert_array_equal(stream.rows(int(a), int(b)), oracle[a:b])
    np.testing.assert_array_equal(stream.rows(0, n), oracle)


# --- the validation hold-out (sampler.holdout, epoch_plan(rows=...)) ---

from mpinn.data.sampler import Sampling, epoch_plan, holdout, remaining  # noqa: E402

pytestmark = pytest.mark.fast  # in-process: the tier of `make test-fast`


def documented_holdout(seed: int, n: int, fraction: float) -> np.ndarray:
    """The hold-out as its docstring defines it, written out independently."""
    return np.sort(np.random.default_rng([seed, 0x7A11]).permutation(n)[:round(fraction * n)])


@pytest.mark.parametrize("n,fraction,batch", [(10, 0.2, 3), (101, 0.1, 7), (600, 0.2, 50),
                                              (600, 0.5, 64), (37, 0.9, 1), (1000, 0.3, 1000)])
@pytest.mark.parametrize("shuffle", ["global", "none"])
def test_an_epoch_trains_on_exactly_the_rows_not_held_out(n, fraction, batch, shuffle):
    held = holdout(5, n, fraction)
    np.testing.assert_array_equal(held, documented_holdout(5, n, fraction))
    assert 0 < len(held) < n
    rows = remaining(n, held)
    expected = np.setdiff1d(np.arange(n), held)
    np.testing.assert_array_equal(rows, expected)
    for epoch in (0, 3):
        batches = None
        for size in (1, 2, 3, 4):
            plans = [epoch_plan(Sampling(shuffle), 5, epoch, n, batch, r, size, rows=rows)
                     for r in range(size)]
            assert all(len(p) == -(-len(expected) // batch) for p in plans)
            # the global batches: the ranks' shares in rank order, the same for every P
            glued = [np.concatenate([p.steps[k] for p in plans]) for k in range(len(plans[0]))]
            assert [len(g) for g in glued] == list(plans[0].batch_rows)
            if batches is None:
                batches = glued
            for a, b in zip(batches, glued, strict=True):
                np.testing.assert_array_equal(a, b)
            seen = np.concatenate(glued)
            assert not np.isin(seen, held).any()  # no held-out row in any batch
            np.testing.assert_array_equal(np.sort(seen), expected)  # each other row once


def test_the_hold_out_depends_on_seed_rows_and_fraction_only():
    a = holdout(1, 500, 0.2)
    assert len(a) == 100 and np.array_equal(a, holdout(1, 500, 0.2))
    assert not np.array_equal(a, holdout(2, 500, 0.2))
    assert len(holdout(1, 500, 0.0)) == 0 and remaining(500, holdout(1, 500, 0.0)) is None
