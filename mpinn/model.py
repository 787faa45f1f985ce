"""The multilayer perceptron: flat parameters, layer views, forward and backward.

All weights and biases live in ONE contiguous vector `params`, all their
gradients in ONE contiguous vector `grads`; `W[i]` (fan_in x fan_out) and `b[i]`
are views into the first, `dW[i]` and `db[i]` into the second. Layer i occupies
one contiguous range [W_i, b_i], layers in order, so the last layer (the first
one whose gradient backward finishes) is the tail of the buffer. The gradient
sync is then one in-place Allreduce of `grads`, with no packing: the caller may
pass `grads` as a view into its own communication buffer (dist.GradientSync).
No MPI and no files here, ever.

Activations and deltas are preallocated for `max_rows` samples, so a step
allocates no arrays of layer width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import functional as F

DTYPES = ("float32", "float64")


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
        return sum(fi * fo + fo for fi, fo in zip(self.sizes[:-1], self.sizes[1:]))


class MLP:
    """A fully connected network, hidden layers with one activation, linear output."""

    def __init__(self, arch: Architecture, max_rows: int, grads: np.ndarray | None = None) -> None:
        """Buffers for up to max_rows samples per forward(); grads: a flat vector to use."""
        self.arch = arch
        self.dtype = np.dtype(arch.dtype)
        self.max_rows = max_rows
        self.params = np.zeros(arch.n_params, self.dtype)
        if grads is None:
            grads = np.zeros(arch.n_params, self.dtype)
        assert grads.shape == (arch.n_params,) and grads.dtype == self.dtype, grads
        assert grads.flags.c_contiguous
        self.grads = grads
        self.W: list[np.ndarray] = []
        self.b: list[np.ndarray] = []
        self.dW: list[np.ndarray] = []
        self.db: list[np.ndarray] = []
        offset = 0
        for fan_in, fan_out in zip(arch.sizes[:-1], arch.sizes[1:]):
            for flat, w_views, b_views in ((self.params, self.W, self.b),
                                           (self.grads, self.dW, self.db)):
                w_views.append(flat[offset:offset + fan_in * fan_out].reshape(fan_in, fan_out))
                b_views.append(flat[offset + fan_in * fan_out:offset + fan_in * fan_out + fan_out])
            offset += fan_in * fan_out + fan_out
        assert offset == arch.n_params
        # acts[0] holds the input rows; acts[i] the output of layer i (acts[-1]: logits).
        self._acts = [np.zeros((max_rows, s), self.dtype) for s in arch.sizes]
        # deltas[i] = d loss / d z for layer i's pre-activation output, shape (rows, sizes[i+1]).
        self._deltas = [np.zeros((max_rows, s), self.dtype) for s in arch.sizes[1:]]
        self._scratch = np.zeros(max_rows * max(arch.sizes), self.dtype)
        self._targets = np.zeros((max_rows, arch.sizes[-1]), self.dtype)
        self._n_rows = 0  # rows of the last forward(), which backward() differentiates

    @property
    def n_layers(self) -> int:
        return len(self.W)

    def layer_ranges(self) -> list[tuple[int, int]]:
        """[start, stop) of each layer's (W, b) in the flat vectors."""
        ranges, offset = [], 0
        for w, b in zip(self.W, self.b):
            ranges.append((offset, offset + w.size + b.size))
            offset += w.size + b.size
        return ranges

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

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Logits for the rows of x (n, D), n <= max_rows; returns a view (n, K)."""
        n = x.shape[0]
        self._n_rows = n
        a = self._acts[0][:n]
        a[...] = x  # cast the input (stored float32) to the model dtype
        last = self.n_layers - 1
        for i, (w, b) in enumerate(zip(self.W, self.b)):
            z = self._acts[i + 1][:n]
            np.matmul(a, w, out=z)  # (n, fan_in) @ (fan_in, fan_out)
            z += b
            if i < last:
                F.activate(self.arch.activation, z)
            a = z
        return a

    def backward(self, y: np.ndarray) -> float:
        """Gradients of the SUMMED loss over the rows of the last forward() into grads.

        Returns that summed loss. With z_i = a_{i-1} W_i + b_i, a_i = f(z_i),
        and delta_i = d loss / d z_i (rows = samples):

            delta_L     = d loss / d logits                 (functional.py)
            dW_i        = a_{i-1}^T delta_i                 (fan_in, n) @ (n, fan_out)
            db_i        = sum over rows of delta_i
            delta_{i-1} = (delta_i W_i^T) * f'(z_{i-1})     (n, fan_out) @ (fan_out, fan_in)

        With zero rows every gradient is exactly zero, so an empty slice still
        contributes a valid (zero) term to the Allreduce.
        """
        n = self._n_rows
        loss = self.loss(y)
        delta = self._deltas[-1][:n]
        for i in range(self.n_layers - 1, -1, -1):
            a_prev = self._acts[i][:n]
            np.matmul(a_prev.T, delta, out=self.dW[i])
            np.sum(delta, axis=0, out=self.db[i])
            if i > 0:
                prev = self._deltas[i - 1][:n]
                np.matmul(delta, self.W[i].T, out=prev)
                scratch = self._scratch[: prev.size].reshape(prev.shape)
                F.activation_backward(self.arch.activation, a_prev, prev, scratch)
                delta = prev
        return loss

    def loss(self, y: np.ndarray) -> float:
        """Summed loss of the last forward() against y (d loss / d logits kept for backward)."""
        n = self._n_rows
        return self.loss_and_delta(self._acts[-1][:n], y, self._deltas[-1][:n])

    def loss_and_delta(self, logits: np.ndarray, y: np.ndarray, delta: np.ndarray) -> float:
        """Summed loss of logits against y; d loss / d logits into delta.

        y holds integer class labels (n,) or float targets (n, K). MSE against
        class labels uses one-hot targets.
        """
        if self.arch.loss == "cross-entropy":
            return F.softmax_cross_entropy(logits, y, delta)
        if y.ndim == 1:
            y = F.one_hot(y, logits.shape[1], self._targets)
        return F.mean_squared_error(logits, y, delta)
