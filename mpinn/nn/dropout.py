"""Dropout masks: a pure function of (seed, global step, layer, global sample index, unit).

A unit is kept with probability 1 - p and then scaled by 1 / (1 - p) (inverted
dropout), so evaluation uses the weights as they are. The decision for unit u of
sample i (its row in the training split) at global step s in hidden layer l is

    w = mix(key(seed, s, l) + (i * half + u // 2) * GOLDEN)    (64-bit, wrapping)
    h = the low 32 bits of w for even u, the high 32 bits for odd u
    keep  <=>  h >= p * 2^32

where half = ceil(width / 2), mix is splitmix64's finaliser (a bijection of
64-bit words) and GOLDEN is odd, so distinct (i, u // 2) of one key never share
a word; each word decides two units, which halves the hashing. Nothing depends on which
rank holds the sample or how the batch is split (ranks, micro-batches): dropout
keeps P-invariance. No generator state, so a resume needs nothing saved.
Cost: about 12 in-place passes over an (n x width/2) uint64 array per layer.
"""

from __future__ import annotations

import numpy as np

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
STREAM = 0xD809  # keeps dropout's words apart from other uses of the seed


def mix_int(x: int) -> int:
    """splitmix64's finaliser on a Python int (for keys)."""
    x &= MASK64
    x = ((x ^ (x >> 30)) * MIX1) & MASK64
    x = ((x ^ (x >> 27)) * MIX2) & MASK64
    return x ^ (x >> 31)


def key(seed: int, step: int, layer: int) -> int:
    return mix_int(mix_int(mix_int(seed ^ STREAM) + step) + layer)


def hash_words(seed: int, step: int, layer: int, indices: np.ndarray, width: int,
               out: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """The words h of the docstring for rows `indices`, units 0..width-1, into out
    (n, width) uint64 (tmp: the same shape), in place. Returns out."""
    np.multiply(indices.astype(np.uint64)[:, None], np.uint64(width), out=out)
    out += np.arange(width, dtype=np.uint64)  # a small (width,) vector
    out *= np.uint64(GOLDEN)
    out += np.uint64(key(seed, step, layer))
    for shift, factor in ((30, MIX1), (27, MIX2), (31, None)):
        np.right_shift(out, np.uint64(shift), out=tmp)
        out ^= tmp
        if factor is not None:
            out *= np.uint64(factor)
    return out


def threshold(p: float) -> np.uint32:
    """The smallest 32-bit half that is kept: P(h >= it) = 1 - p (up to 2^-32)."""
    return np.uint32(min(int(p * 2.0**32), 2**32 - 1))


def halves(words: np.ndarray, width: int) -> np.ndarray:
    """(n, width) uint32 view of (n, ceil(width/2)) words: unit u is half u % 2 of word
    u // 2 (the low half first, on the little-endian machines mpinn runs on)."""
    return words.view(np.uint32)[:, :width]


def keep_mask(seed: int, step: int, layer: int, indices: np.ndarray, width: int,
              p: float) -> np.ndarray:
    """Boolean (n, width): which units are kept (allocates; for tests and tools)."""
    n, half = len(indices), -(-width // 2)
    out, tmp = np.empty((n, half), np.uint64), np.empty((n, half), np.uint64)
    words = hash_words(seed, step, layer, np.asarray(indices), half, out, tmp)
    return halves(words, width) >= threshold(p)


class Dropout:
    """Preallocated masks for the hidden layers of one model (values 0 or 1/(1-p))."""

    def __init__(self, rates: tuple[float, ...], widths: tuple[int, ...], max_rows: int,
                 seed: int, dtype: np.dtype | str) -> None:
        """rates: one per hidden layer (or one for all); widths: the hidden widths."""
        if len(rates) == 1:
            rates = rates * len(widths)
        assert len(rates) == len(widths), (rates, widths)
        self.rates, self.widths, self.seed = rates, widths, seed
        size = max_rows * max(widths)
        self._words, self._tmp = np.zeros(size, np.uint64), np.zeros(size, np.uint64)
        self._kept = np.zeros(size, bool)
        self._masks = [np.zeros((max_rows, w), dtype) if p > 0 else None
                       for p, w in zip(rates, widths)]

    def masks(self, step: int, indices: np.ndarray) -> list[np.ndarray | None]:
        """The masks of global step `step` for the samples `indices` (views, (n, width))."""
        n, out = len(indices), []
        for layer, (p, w, mask) in enumerate(zip(self.rates, self.widths, self._masks)):
            if mask is None:
                out.append(None)
                continue
            half = -(-w // 2)
            words = hash_words(self.seed, step, layer, indices, half,
                               self._words[:n * half].reshape(n, half),
                               self._tmp[:n * half].reshape(n, half))
            kept = self._kept[:n * w].reshape(n, w)
            np.greater_equal(halves(words, w), threshold(p), out=kept)
            np.multiply(kept, 1.0 / (1.0 - p), out=mask[:n])
            out.append(mask[:n])
        return out
