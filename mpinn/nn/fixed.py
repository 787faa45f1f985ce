"""Fixed-point arithmetic carried in float64: what makes --reproducible's sums exact.

A float64 holds every integer up to 2^53 exactly, and a sum or product of such
integers is exact while no partial result passes 2^53. So a GEMM of integer-valued
float64 matrices gives the same bits however BLAS blocks it, and an Allreduce of
integer-valued float64 sums the same bits in any order: whatever the number of ranks
and the rows each holds. A tensor T enters such a sum on its grid

    T ~ s * Q,   Q = rint(T / s) integers, |Q| <= 2^bits,   s = 2^(e + HEADROOM - bits)

where |T| < 2^e (e from the reduced maximum of the previous step, the same on every
rank; for weights, from their own maximum, which every rank has). The bit budget
(Budget) keeps every sum of products below 2^53. A value past its grid (the tensor
grew by more than 2^HEADROOM since the last step) is saturated and reported: the
step is then redone on grids from this step's maxima (train/step.py).

Sums that are not products (losses, the gradient's norm) use the same idea: every
term rounded, alone, onto a grid fixed before the sum, then summed as integers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MANTISSA = 53  # float64 holds every integer of at most this many bits
HEADROOM = 1  # a tensor may grow by 2^HEADROOM over the last step's maximum
MIN_BITS = 8  # fewer bits per tensor than this: refused (a grid that coarse is noise)
MAX_BITS = 26  # more buys nothing: float64's own rounding of the results is 2^-53
LOWEST = -400  # exponents are kept in [LOWEST, HIGHEST]: every product of two grids,
HIGHEST = 400  # and every inverse, stays a normal float64 (an exact power of two)
UNSEEN = float(LOWEST)  # the exponent of an empty or all-zero tensor
LOSS_FRACTION = 64  # an exact loss rounds each row's loss to a multiple of 2^-64 ...
LIMB_BITS = 24  # ... and sums it as a Python int, sent as LIMBS float64 limbs of 24
LIMBS = 8  # bits (the top one signed): exact in a float64 SUM of up to 2^29 ranks
CHUNK = 1 << 16  # square_parts takes a gradient in chunks of this many values


def lg(n: int) -> int:
    """ceil(log2 n) for n >= 1: the bits a sum of n terms adds."""
    return max(0, int(n) - 1).bit_length()


@dataclass(frozen=True)
class Budget:
    """Bits of each layer's grids: input activations a, deltas d and weights w.

    For layer i with K_in inputs, K_out outputs and a global batch of B rows:
        forward   a_{i-1} W_i:    act + weight + lg K_in  <= 53
        backward  d_i W_i^T:      delta + weight + lg K_out <= 53
        gradient  a_{i-1}^T d_i:  act + delta + lg B      <= 53  (over all ranks)
    act = delta = the larger half the batch and the widths leave; weight: the rest.
    """

    act: tuple[int, ...]
    delta: tuple[int, ...]
    weight: tuple[int, ...]

    @classmethod
    def plan(cls, sizes: tuple[int, ...], batch: int) -> Budget:
        """The grids of a model of these layer sizes trained on global batches of `batch`
        rows; ValueError naming the bound if some grid would get fewer than MIN_BITS."""
        act, delta, weight = [], [], []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            width = max(lg(fan_in), lg(fan_out))
            bits = min(MAX_BITS, (MANTISSA - lg(batch)) // 2, (MANTISSA - width) // 2)
            act.append(bits)
            delta.append(bits)
            weight.append(min(MAX_BITS, MANTISSA - width - bits))
        if min(act + weight) < MIN_BITS:
            raise ValueError(f"a global batch of {batch:,} rows and layers of "
                             f"{max(sizes):,} units leave fewer than {MIN_BITS} bits per "
                             f"value in 53 (ceil(log2 batch) + 2 x bits <= 53)")
        return cls(tuple(act), tuple(delta), tuple(weight))

    @property
    def exponents(self) -> int:
        """The grid exponents a step reduces: every layer's input and delta."""
        return 2 * len(self.act)

    def describe(self) -> str:
        return ", ".join(f"layer {i + 1}: a {a}, d {d}, W {w} bits" for i, (a, d, w)
                         in enumerate(zip(self.act, self.delta, self.weight)))


def exponent(t: np.ndarray) -> float:
    """e with every |t| < 2^e (as a float, for a MAX Allreduce); UNSEEN for an empty or
    all-zero tensor, and for a non-finite one (divergence is not a grid's business)."""
    if t.size == 0:
        return UNSEEN
    top = max(float(t.max()), -float(t.min()))
    if not math.isfinite(top) or top == 0:
        return UNSEEN
    return float(min(max(math.frexp(top)[1], LOWEST), HIGHEST + HEADROOM + 1))


def grid(e: float, bits: int, headroom: int = HEADROOM) -> float:
    """The grid step s = 2^(e + headroom - bits) of a tensor below 2^e."""
    return math.ldexp(1.0, int(min(max(e, LOWEST), HIGHEST)) + headroom - bits)


def quantize(t: np.ndarray, out: np.ndarray, step: float, bits: int, seen: float,
             grid_e: float, headroom: int = HEADROOM) -> None:
    """out <- rint(t / step), integers in float64: t on its grid. `seen` is t's exponent
    (exponent(t)); past the grid (seen > grid_e + headroom) the values are saturated at
    +-2^bits, so the sums stay exact and the caller redoes the step on wider grids."""
    np.multiply(t, 1.0 / step, out=out)  # a power of two: exact
    np.rint(out, out=out)
    if seen > grid_e + headroom:
        limit = math.ldexp(1.0, bits)
        np.clip(out, -limit, limit, out=out)


def exact_int(values: np.ndarray) -> int | None:
    """The sum of values, each rounded alone to a multiple of 2^-LOSS_FRACTION, as an
    integer count of 2^-LOSS_FRACTION (None if some value is not finite). The same
    for any order or split of the values."""
    if values.size == 0:
        return 0
    scaled = np.ldexp(values.astype(np.float64), LOSS_FRACTION)
    if not np.isfinite(scaled).all():
        return None
    return sum(map(int, np.rint(scaled).tolist()))


def to_limbs(total: int | None, out: np.ndarray) -> None:
    """An exact_int() total as LIMBS float64 limbs (SUM-reducible, exactly); NaN limbs
    for None or a total past the top limb's range."""
    if total is None or abs(total) >= 1 << (LIMB_BITS * LIMBS):  # (the top limb too
        #                                       stays below 2^24: exact for 2^29 ranks)
        out[:LIMBS] = np.nan
        return
    mask = (1 << LIMB_BITS) - 1
    for k in range(LIMBS - 1):
        out[k] = total & mask  # 0 <= limb < 2^24 (the top limb carries the sign)
        total >>= LIMB_BITS
    out[LIMBS - 1] = total


def from_limbs(limbs: np.ndarray) -> float:
    """The value of summed limbs: the exact total, rounded once to float64."""
    if not np.isfinite(limbs[:LIMBS]).all():
        return math.nan
    total = sum(int(v) << (LIMB_BITS * k) for k, v in enumerate(limbs[:LIMBS].tolist()))
    return math.ldexp(float(total), -LOSS_FRACTION) if total.bit_length() < 1000 else math.inf


def square_parts(g: np.ndarray, top: float, count: int, scratch: np.ndarray,
                 out: np.ndarray) -> None:
    """out[:2] <- |g|^2 as two integer-valued parts (SUM-reducible, exactly) on grids
    fixed by `top`, the exponent of max |g| over all `count` terms (of every rank):
    each g_i^2 is rounded onto a coarse grid (part 0) and its remainder onto a finer
    one (part 1), so |g|^2 = part0 * s0 + part1 * s1 within count * 2^-104 of max g^2
    (square_value). The same for any order or split of the terms. scratch: two chunks
    (2 x CHUNK values, or fewer), which g is taken in."""
    s0, bits = square_grid(top, count)
    chunk = len(scratch) // 2
    out[:2] = 0
    for lo in range(0, g.size, chunk):
        part = g[lo:lo + chunk]
        sq, q = scratch[:part.size], scratch[chunk:chunk + part.size]
        np.multiply(part, part, out=sq)
        np.multiply(sq, 1.0 / s0, out=q)
        np.rint(q, out=q)
        out[0] += q.sum()  # integers below 2^52 in all: exact
        q *= s0
        np.subtract(sq, q, out=sq)  # the remainders, exact, |r| <= s0 / 2
        sq *= math.ldexp(1.0 / s0, bits)
        np.rint(sq, out=sq)
        out[1] += sq.sum()


def square_value(parts: np.ndarray, top: float, count: int) -> float:
    """|g|^2 from square_parts' (reduced) parts."""
    s0, bits = square_grid(top, count)
    return float(parts[0]) * s0 + float(parts[1]) * math.ldexp(s0, -bits)


def square_grid(top: float, count: int) -> tuple[float, int]:
    """square_parts' coarse grid step for squares below 2^(2 top), and the bits of each
    part: count terms of that many bits sum below 2^52."""
    bits = MANTISSA - 1 - lg(max(count, 2))
    return math.ldexp(1.0, int(2 * min(top, HIGHEST)) - bits), bits
