"""The multilayer perceptron: its architecture with the flat layout of its parameters
(Architecture), and forward and backward on preallocated buffers (MLP).

All weights and biases live in ONE contiguous vector `params`, all their
gradients in ONE contiguous vector `grads`; `W[i]` (fan_in x fan_out) and `b[i]`
are views into the first, `dW[i]` and `db[i]` into the second. Layer i occupies
one contiguous range [W_i, b_i], layers in order, so the last layer (the first
one whose gradient backward finishes) is the tail of the buffer. The gradient
sync is then in-place Allreduces of slices of `grads`, with no packing, started
as backward finishes them (BackwardHooks): the caller may pass `grads` as a view
into its own communication buffer (gradsync.GradientSync).
No MPI and no files here, ever.

Activations and deltas are preallocated for `max_rows` samples, so a step
allocates no arrays of layer width.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from mpinn.nn import functional as F

DTYPES = ("float32", "float64")
# Backward computes each layer's dW in row panels, last rows first, so that a gradient
# sync in flight sends the rows done while the others compute. At most PANEL_ELEMENTS
# outputs a panel (2 MiB in float32): smaller panels cost GEMM speed (a 1024 x 1024 dW
# at 2048 rows took 1.03x one GEMM in 2 panels here, 1.07x in 4, 1.29x in 16). The first
# layer's dW comes last, with no product after it to hide its messages behind, so its
# panels shrink toward its end, down to TAIL_ELEMENTS: the message left after backward
# is small.
PANEL_ELEMENTS = 1 << 19
TAIL_ELEMENTS = 1 << 16


@dataclass(frozen=True)
class Architecture:
    """What defines a model: layer sizes (input, hidden..., output) and its functions."""

    sizes: tuple[int, ...]
    activation: str = "relu"
    loss: str = "cross-entropy"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if len(self.sizes) < 2 or any(int(s) < 1 for s in self.sizes):
            raise ValueError(f"layer sizes must be >= 1, got {self.sizes}")
        if self.activation not in F.ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}")
        if self.loss not in F.LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}")

    @property
    def n_params(self) -> int:
        return self.layer_ranges()[-1][1]

    def layer_ranges(self) -> list[tuple[int, int]]:
        """[start, stop) of each layer's parameters in the flat vectors: layer i's W_i
        (fan_in x fan_out, row-major), then its b_i; layers in order."""
        ranges, offset = [], 0
        for fan_in, fan_out in zip(self.sizes[:-1], self.sizes[1:]):
            ranges.append((offset, offset + fan_in * fan_out + fan_out))
            offset = ranges[-1][1]
        return ranges

    def panels(self, i: int) -> tuple[tuple[int, int], ...]:
        """[lo, hi) row panels of layer i's dW (fan_in x fan_out), in row order (backward
        computes them last first): fixed by the shapes alone, so both sync modes compute
        the same panels and every rank the same. Layer 0's shrink toward row 0."""
        return panels(self.sizes[i], self.sizes[i + 1], tail=i == 0)

    def views(self, flat: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Every layer's W (fan_in x fan_out) and b (fan_out,) as views into a flat vector
        of n_params values (no copy: writing a view writes the vector)."""
        assert flat.shape == (self.n_params,) and flat.flags.c_contiguous, flat.shape
        weights, biases = [], []
        for (start, stop), fan_in, fan_out in zip(self.layer_ranges(), self.sizes[:-1],
                                                  self.sizes[1:]):
            weights.append(flat[start:stop - fan_out].reshape(fan_in, fan_out))
            biases.append(flat[stop - fan_out:stop])
        return weights, biases


@functools.cache
def panels(rows: int, width: int, tail: bool) -> tuple[tuple[int, int], ...]:
    """Row panels of a rows x width product (Architecture.panels): equal ones of at most
    PANEL_ELEMENTS outputs (or one row); with tail, doubling from TAIL_ELEMENTS at row 0
    up to that. (Cached: tests that change the two sizes call panels.cache_clear().)"""
    cap = max(1, PANEL_ELEMENTS // width)
    if not tail:
        count = -(-rows // cap)
        edges = [rows * k // count for k in range(count + 1)]
    else:
        edges, size = [0], max(1, TAIL_ELEMENTS // width)
        while edges[-1] < rows:
            edges.append(min(rows, edges[-1] + size))
            size = min(2 * size, cap)
        if len(edges) > 2 and 2 * (edges[-1] - edges[-2]) < edges[-2] - edges[-3]:
            del edges[-2]  # a top panel under half the one before joins it, in two
            if edges[-1] - edges[-2] > cap:  # halves if that is over the cap
                edges.insert(-1, (edges[-2] + edges[-1]) // 2)
    return tuple(zip(edges[:-1], edges[1:]))


class BackwardHooks(Protocol):
    """What backprop() tells whoever waits for the gradients (a gradient sync)."""

    def ready(self, start: int, stop: int) -> None:
        """grads[start:stop] is final (the final part only grows, from the end)."""

    def compute(self, work: Callable[[], None]) -> None:
        """Run work, a panel of backward's products (a gradient sync tests its messages
        in flight meanwhile, or at least when it is done)."""


def run(hooks: BackwardHooks | None, work: Callable[..., None], *args: object) -> None:
    """work(*args), a panel of backward, through the hooks if any (hooks.compute)."""
    if hooks is None:
        work(*args)
    else:
        hooks.compute(functools.partial(work, *args))


class MLP:
    """A fully connected network, hidden layers with one activation, linear output."""

    def __init__(self, arch: Architecture, max_rows: int, grads: np.ndarray | None = None,
                 dropout: bool = False, accumulate: bool = False) -> None:
        """Buffers for up to max_rows samples per forward(); grads: a flat vector to use.
        dropout: keep room for masked activations; accumulate: for backward(add=True)."""
        self.arch = arch
        self.dtype = np.dtype(arch.dtype)
        self.max_rows = max_rows
        self.params = np.zeros(arch.n_params, self.dtype)
        if grads is None:
            grads = np.zeros(arch.n_params, self.grad_dtype)
        assert grads.dtype == self.grad_dtype, grads.dtype
        self.grads = grads
        self.W, self.b = arch.views(self.params)  # the flat layout is the architecture's
        self.dW, self.db = arch.views(self.grads)
        # acts[0] holds the input rows; acts[i] the output of layer i (acts[-1]: logits).
        self._acts = [np.zeros((max_rows, s), self.dtype) for s in arch.sizes]
        # deltas[i] = d loss / d z for layer i's pre-activation output, shape (rows, sizes[i+1]).
        self._deltas = [np.zeros((max_rows, s), self.dtype) for s in arch.sizes[1:]]
        self._scratch = np.zeros(max_rows * max(arch.sizes), self.dtype)
        self._targets = np.zeros((max_rows, arch.sizes[-1]), self.dtype)
        self.row_losses = np.zeros(max_rows, self.dtype)  # each row's, of the last loss()
        # with dropout: f(z) of each hidden layer before its mask (acts then hold m * f(z))
        self._unmasked = [np.zeros((max_rows, s), self.dtype) if dropout else None
                          for s in arch.sizes[1:-1]]
        self._masks: list[np.ndarray | None] = []  # of the last forward()
        # accumulate: one layer's dW, added to grads (a second, full gradient is not needed)
        self._dw = np.zeros(max(w.size for w in self.dW) if accumulate else 0,
                            self.grad_dtype)
        self._db = np.zeros(max(arch.sizes[1:]) if accumulate else 0, self.grad_dtype)
        self._n_rows = 0  # rows of the last forward(), which backward() differentiates

    @property
    def grad_dtype(self) -> np.dtype:
        """The gradients' dtype: the model's (exact.py's fixed-point model: float64)."""
        return self.dtype

    @property
    def n_layers(self) -> int:
        return len(self.W)

    def prepare(self, evaluation: bool = False) -> None:
        """Before a step or an evaluation, after the weights changed (exact.py: their
        grids, and for an evaluation each row's own)."""

    def init(self, rng: np.random.Generator) -> None:
        """He-normal weights for relu, Glorot-uniform for tanh/sigmoid; zero biases.

        Drawn in float64 and then rounded, so the float32 model starts from the
        float64 model's weights and both depend on the generator alone.
        """
        for w, b in zip(self.W, self.b):
            fan_in, fan_out = w.shape
            if self.arch.activation == "relu":
                values = rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)
            else:
                limit = np.sqrt(6.0 / (fan_in + fan_out))
                values = rng.uniform(-limit, limit, (fan_in, fan_out))
            w[...] = values
            b.fill(0)

    def forward(self, x: np.ndarray, masks: list[np.ndarray | None] | None = None
                ) -> np.ndarray:
        """Logits for the rows of x (n, D), n <= max_rows; returns a view (n, K).

        masks (training with dropout): one (n, width) array per hidden layer, or
        None for a layer without dropout; hidden output i becomes m_i * f(z_i).
        """
        n = x.shape[0]
        self._n_rows = n
        self._masks = masks or []
        a = self._acts[0][:n]
        a[...] = x  # cast the input (stored float32) to the model dtype
        last = self.n_layers - 1
        for i, b in enumerate(self.b):
            z = self._acts[i + 1][:n]
            self._product(i, a, z)  # (n, fan_in) @ (fan_in, fan_out)
            z += b
            if i < last:
                F.activate(self.arch.activation, z)
                if self._masks and self._masks[i] is not None:
                    unmasked = self._unmasked[i]
                    assert unmasked is not None, "MLP built without dropout=True"
                    unmasked[:n] = z
                    z *= self._masks[i]
            a = z
        return a

    def backward(self, y: np.ndarray, add: bool = False, hooks: BackwardHooks | None = None
                 ) -> float:
        """Gradients of the SUMMED loss over the rows of the last forward() into grads
        (add: added to what grads holds, for micro-batches; needs accumulate=True).

        Returns that summed loss. With z_i = a_{i-1} W_i + b_i, a_i = m_i * f(z_i)
        (m_i the dropout mask, entries 0 or 1/(1-p); m_i = 1 without dropout), and
        delta_i = d loss / d z_i (rows = samples):

            delta_L     = d loss / d logits                 (functional.py)
            dW_i        = a_{i-1}^T delta_i                 (fan_in, n) @ (n, fan_out)
            db_i        = sum over rows of delta_i
            delta_{i-1} = (delta_i W_i^T) * m_{i-1} * f'(z_{i-1})
                                                            (n, fan_out) @ (fan_out, fan_in)

        The mask is a constant of the step, so d a / d z = m * f'(z): dropped units
        pass no gradient, kept ones pass it scaled by 1/(1-p). f' is taken from the
        unmasked f(z). With zero rows every gradient is exactly zero, so an empty
        slice still contributes a valid (zero) term to the Allreduce.
        """
        loss = self.loss(y)
        self.backprop(add, hooks)
        return loss

    def backprop(self, add: bool = False, hooks: BackwardHooks | None = None) -> None:
        """backward() after loss(): the gradients from the delta loss() left (see backward).

        The large products are computed in panels fixed by the layer shapes
        (Architecture.panels), whoever asks. With hooks, hooks.ready(start, stop) says
        when grads[start:stop] is final: the layers come last to first, each layer's
        bias, then its weight rows last to first, so what is final always grows from
        the end of the vector (a contiguous tail); every panel runs through
        hooks.compute() (a gradient sync tests its messages meanwhile).
        """
        n = self._n_rows
        delta = self._deltas[-1][:n]
        ranges = self.arch.layer_ranges()
        for i in range(self.n_layers - 1, -1, -1):
            self._delta_final(i, delta)
            a_prev = self._acts[i][:n]
            self._layer_grads(i, a_prev, delta, add, ranges[i], hooks)
            if i > 0:  # delta_{i-1}, in one product (its messages are tested meanwhile)
                prev = self._deltas[i - 1][:n]
                run(hooks, self._delta_product, i, delta, prev)
                scratch = self._scratch[: prev.size].reshape(prev.shape)
                mask = self._masks[i - 1] if self._masks else None
                if mask is not None:
                    prev *= mask
                    a_prev = self._unmasked[i - 1][:n]  # type: ignore[index]
                F.activation_backward(self.arch.activation, a_prev, prev, scratch)
                delta = prev

    def _layer_grads(self, i: int, a_prev: np.ndarray, delta: np.ndarray, add: bool,
                     span: tuple[int, int], hooks: BackwardHooks | None) -> None:
        """db_i = sum of delta_i's rows, then dW_i = a_{i-1}^T delta_i in row panels
        (last first): into, or added to, grads; span: layer i's [start, stop) in grads."""
        fan_out = self.arch.sizes[i + 1]
        start, stop = span
        if add:
            assert self._dw.size, "MLP built without accumulate=True"
            self._bias_grad(i, delta, self._db[:fan_out])
            self.db[i] += self._db[:fan_out]
        else:
            self._bias_grad(i, delta, self.db[i])
        if hooks is not None:
            hooks.ready(stop - fan_out, stop)
        for lo, hi in reversed(self.arch.panels(i)):
            run(hooks, self._weight_rows, i, a_prev, delta, lo, hi, add)
            if hooks is not None:
                hooks.ready(start + lo * fan_out, start + hi * fan_out)

    def _weight_rows(self, i: int, a_prev: np.ndarray, delta: np.ndarray, lo: int, hi: int,
                     add: bool) -> None:
        """Rows lo:hi of dW_i into, or added to (add), grads."""
        if add:
            fan_out = self.arch.sizes[i + 1]
            dw = self._dw[:(hi - lo) * fan_out].reshape(hi - lo, fan_out)
            self._weight_panel(i, a_prev, delta, lo, hi, dw)
            self.dW[i][lo:hi] += dw
        else:
            self._weight_panel(i, a_prev, delta, lo, hi, self.dW[i][lo:hi])

    # The products, which exact.py carries out in fixed point instead.
    def _product(self, i: int, a: np.ndarray, z: np.ndarray) -> None:
        """z <- a W_i (forward)."""
        np.matmul(a, self.W[i], out=z)

    def _delta_final(self, i: int, delta: np.ndarray) -> None:
        """delta_i is computed: the products that read it follow (backward)."""

    def _bias_grad(self, i: int, delta: np.ndarray, out: np.ndarray) -> None:
        """out <- sum over rows of delta_i (db_i)."""
        np.sum(delta, axis=0, out=out)

    def _weight_panel(self, i: int, a_prev: np.ndarray, delta: np.ndarray, lo: int, hi: int,
                      out: np.ndarray) -> None:
        """out <- rows lo:hi of dW_i = a_{i-1}^T delta_i."""
        np.matmul(a_prev[:, lo:hi].T, delta, out=out)  # no copy: BLAS reads it transposed

    def _delta_product(self, i: int, delta: np.ndarray, out: np.ndarray) -> None:
        """out <- delta_i W_i^T (before f' and the mask)."""
        np.matmul(delta, self.W[i].T, out=out)

    def loss(self, y: np.ndarray) -> float:
        """Summed loss of the last forward() against y (d loss / d logits kept for backward)."""
        n = self._n_rows
        return self.loss_and_delta(self._acts[-1][:n], y, self._deltas[-1][:n],
                                   self.row_losses[:n])

    def loss_and_delta(self, logits: np.ndarray, y: np.ndarray, delta: np.ndarray,
                       rows: np.ndarray) -> float:
        """Summed loss of logits against y; d loss / d logits into delta, each row's
        loss into rows.

        y holds integer class labels (n,) or float targets (n, K). MSE against
        class labels uses one-hot targets.
        """
        if self.arch.loss == "cross-entropy":
            return F.softmax_cross_entropy(logits, y, delta, rows)
        if y.ndim == 1:
            y = F.one_hot(y, logits.shape[1], self._targets)
        return F.mean_squared_error(logits, y, delta, rows)
