"""The sampler's block stream against a materialised oracle (serial, no MPI)."""

from __future__ import annotations

import numpy as np
import pytest

from mpinn.sampler import BlockStream


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
