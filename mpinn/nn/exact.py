"""The MLP of --reproducible: every product that sums across rows or inputs is exact.

ExactMLP is MLP with its products carried out in fixed point (fixed.py): before each
product its operands are put on their grids, integers in float64, so the product is
exact whatever BLAS does with the shapes, and it is scaled back by a power of two.
What lies between the products (bias, activation, dropout mask, loss, f') is
elementwise or within one row, which gives the same bits for a row wherever it lies.
So a row's forward does not depend on how many rows share the GEMM; the gradient's
sums (of integers on one grid per layer, float64 always) are exact, on one rank and
through any Allreduce. Per layer i, with a_{i-1} its input and d_i its delta:

    z_i     = (Q(a_{i-1}) Q(W_i)) s_a s_W + b_i
    dW_i    = (Q(a_{i-1})^T Q(d_i)) s_a s_d           db_i = (sum of Q(d_i)'s rows) s_d
    d_{i-1} = ((Q(d_i) Q(W_i)^T) s_d s_W) * m_{i-1} * f'(z_{i-1})

(the derivatives are MLP.backward's, of the network with quantized operands).
The activation and delta grids come from the previous step's maxima (grid_e, the same
on every rank); `seen` collects this attempt's maxima, which the sync reduces (MAX)
to decide, alike on every rank, whether the step fits (fits()) or is redone.
"""

from __future__ import annotations

import time

import numpy as np

from mpinn.nn import fixed
from mpinn.nn.model import MLP, Architecture


class ExactMLP(MLP):
    """An MLP whose products are exact (fixed point in float64); gradients in float64."""

    def __init__(self, arch: Architecture, max_rows: int, budget: fixed.Budget,
                 seen: np.ndarray | None = None, grads: np.ndarray | None = None,
                 dropout: bool = False, accumulate: bool = False) -> None:
        """seen: where to keep this attempt's exponents (2 per layer: the input, then the
        delta), e.g. a view of the sync's buffer that reduces them."""
        super().__init__(arch, max_rows, grads, dropout, accumulate)
        layers = self.n_layers
        self.budget = budget
        self._aq = [np.zeros((max_rows, s)) for s in arch.sizes[:-1]]
        self._dq = [np.zeros((max_rows, s)) for s in arch.sizes[1:]]
        self._wq_flat = np.zeros(arch.n_params)
        self._wq = arch.views(self._wq_flat)[0]
        self._prod = np.zeros(max_rows * max(arch.sizes)) if self.dtype != np.float64 \
            else np.zeros(0)
        # grid exponents in use: every layer's input, then every layer's delta
        self.grid_e = np.zeros(2 * layers)
        self.seen = seen if seen is not None else np.zeros(2 * layers)
        assert self.seen.shape == (2 * layers,), self.seen.shape
        self._s_a = [1.0] * layers  # this attempt's grid steps (a, d, W)
        self._s_d = [1.0] * layers
        self._s_w = [1.0] * layers
        self.grid_s = 0.0  # seconds spent putting tensors on their grids (benchmarks)
        self._rowwise = False  # prepare(evaluation=True): forward on each row's own grid

    @property
    def grad_dtype(self) -> np.dtype:
        return np.dtype(np.float64)

    def prepare(self, evaluation: bool = False) -> None:
        """The weights on their grids (from their own maximum: the same on every rank),
        and this attempt's maxima reset. evaluation: the forward passes that follow put
        each row on a grid of its own (rowwise), not on the training grids."""
        self._rowwise = evaluation
        began = time.perf_counter()
        for i, w in enumerate(self.W):
            e, bits = fixed.exponent(w), self.budget.weight[i]
            self._s_w[i] = fixed.grid(e, bits, headroom=0)
            fixed.quantize(w, self._wq[i], self._s_w[i], bits, e, e, headroom=0)
        self.seen.fill(fixed.UNSEEN)
        self.grid_s += time.perf_counter() - began

    def fits(self) -> bool:
        """After the sync reduced `seen`: whether every value was on its grid."""
        return bool((self.seen <= self.grid_e + fixed.HEADROOM).all())

    def adopt(self) -> None:
        """The next attempt's grids: from this attempt's (reduced) maxima."""
        self.grid_e[:] = self.seen

    def _on_grid(self, slot: int, t: np.ndarray, out: np.ndarray, bits: int) -> float:
        """t's integers into out on grid `slot`'s step (returned); its maximum noted."""
        began = time.perf_counter()
        e = fixed.exponent(t)
        self.seen[slot] = max(self.seen[slot], e)
        step = fixed.grid(self.grid_e[slot], bits)
        fixed.quantize(t, out, step, bits, e, self.grid_e[slot])
        self.grid_s += time.perf_counter() - began
        return step

    def _scaled(self, x: np.ndarray, y: np.ndarray, scale: float | np.ndarray,
                out: np.ndarray) -> None:
        """out <- (x @ y) * scale, the product exact (integers) and the scale a power of two
        (or a column of them, one per row); through float64 scratch for a float32 model."""
        if out.dtype == np.float64:
            np.matmul(x, y, out=out)
            out *= scale
            return
        tmp = self._prod[:out.size].reshape(out.shape)
        np.matmul(x, y, out=tmp)
        np.multiply(tmp, scale, out=out)

    def _product(self, i: int, a: np.ndarray, z: np.ndarray) -> None:
        aq = self._aq[i][:len(a)]
        if self._rowwise:
            self._scaled(aq, self._wq[i], rowwise(a, aq, self.budget.act[i])
                         * self._s_w[i], z)
            return
        self._s_a[i] = self._on_grid(i, a, aq, self.budget.act[i])
        self._scaled(aq, self._wq[i], self._s_a[i] * self._s_w[i], z)

    def _delta_final(self, i: int, delta: np.ndarray) -> None:
        self._s_d[i] = self._on_grid(self.n_layers + i, delta, self._dq[i][:len(delta)],
                                     self.budget.delta[i])

    def _bias_grad(self, i: int, delta: np.ndarray, out: np.ndarray) -> None:
        np.sum(self._dq[i][:len(delta)], axis=0, out=out)  # integers: exact
        out *= self._s_d[i]

    def _weight_panel(self, i: int, a_prev: np.ndarray, delta: np.ndarray, lo: int, hi: int,
                      out: np.ndarray) -> None:
        n = len(delta)
        np.matmul(self._aq[i][:n, lo:hi].T, self._dq[i][:n], out=out)
        out *= self._s_a[i] * self._s_d[i]

    def _delta_product(self, i: int, delta: np.ndarray, out: np.ndarray) -> None:
        self._scaled(self._dq[i][:len(delta)], self._wq[i].T,
                     self._s_d[i] * self._s_w[i], out)


def rowwise(a: np.ndarray, out: np.ndarray, bits: int) -> np.ndarray:
    """Evaluation: each row of a on a grid of its own, from its own maximum, into out (so
    no value is ever past a grid, whatever the training grids: a forward product never
    sums across rows, so it stays exact). Returns the rows' grid steps, a column."""
    top = np.maximum(a.max(axis=1, initial=0.0), -a.min(axis=1, initial=0.0))
    e = np.clip(np.frexp(top)[1], fixed.LOWEST, fixed.HIGHEST)
    steps = np.ldexp(1.0, e + fixed.HEADROOM - bits)[:, None]
    np.divide(a, steps, out=out)  # powers of two: exact
    np.rint(out, out=out)
    return steps
