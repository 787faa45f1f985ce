"""A keyed permutation of [0, n) that is computed, not stored: `--shuffle feistel`.

Position i of an epoch maps to row perm(i), where perm is a Feistel network on k-bit
numbers, 2^k the smallest power of two >= n (so the domain is below 2n), with
cycle-walking: perm(i) = f(i), f(f(i)), ... until the value is below n. Each of
ROUNDS rounds splits x into a high part L and a low part R and maps

    (L, R) -> (R, L xor F_j(R) mod 2^|L|)

whose inverse is plain, so every round is a bijection of k-bit numbers whatever the
widths; with an odd k the widths alternate, and an even number of rounds brings them
back. F_j is a 64-bit integer mix (splitmix64's finaliser) of R and a round key drawn
from a generator seeded by the key (seed, epoch, stream). Cycle-walking from a value
of [0, n) ends in [0, n) (the walk follows the cycle of a bijection, which returns),
after fewer than 2 steps on average since n > 2^(k - 1).

Memory is O(1) in n: a batch's positions in, its rows out, vectorised. The order is
not a cryptographic one; its quality is what tests/test_feistel.py checks (every n a
permutation, positions uniform by a seeded chi-square test).
"""

from __future__ import annotations

import numpy as np

ROUNDS = 4
M1, M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective 64-bit mix (uint64 in, uint64 out)."""
    x = x ^ (x >> np.uint64(30))
    x = x * M1
    x = x ^ (x >> np.uint64(27))
    x = x * M2
    return x ^ (x >> np.uint64(31))


class Feistel:
    """perm: [0, n) -> [0, n), a bijection keyed by `key` (a tuple of ints)."""

    def __init__(self, n: int, key: tuple[int, ...]) -> None:
        assert n >= 1, n
        self.n = n
        self.bits = max(2, int(n - 1).bit_length())  # 2^bits >= n > 2^(bits - 1)
        rng = np.random.default_rng([*key, 0xFE15])
        self.keys = rng.integers(0, 2**63, ROUNDS, dtype=np.uint64)
        self.high = (self.bits + 1) // 2  # the widths of L and R in round 0
        self.low = self.bits - self.high

    def _once(self, x: np.ndarray) -> np.ndarray:
        """One pass of the network over k-bit numbers (uint64)."""
        hi_bits, lo_bits = self.high, self.low
        for key in self.keys:
            left, right = x >> np.uint64(lo_bits), x & np.uint64((1 << lo_bits) - 1)
            f = mix(right ^ key) & np.uint64((1 << hi_bits) - 1)
            x = (right << np.uint64(hi_bits)) | (left ^ f)  # (R, L ^ F(R)): widths swap
            hi_bits, lo_bits = lo_bits, hi_bits
        return x

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """The rows at these positions (int64 in [0, n)), cycle-walking above n."""
        x = self._once(np.asarray(positions, np.uint64))
        out = x >= np.uint64(self.n)
        while out.any():
            x[out] = self._once(x[out])
            out = x >= np.uint64(self.n)
        return x.astype(np.int64)
