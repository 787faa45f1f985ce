"""Activations and losses, with the derivatives the backward pass needs.

Everything here works in place on preallocated arrays, so a training step
allocates nothing proportional to the layer widths (only a few per-sample
vectors). Activation derivatives are written in terms of the activation's
*output* a = f(z), which is what the forward pass keeps.

Losses return the SUM over the samples they are given (not the mean): each rank
sums over its slice, the sums are allreduced, and only then is the total divided
by the global sample count (see docs/design.md, section 1).
"""

from __future__ import annotations

import numpy as np

ACTIVATIONS = ("relu", "tanh", "sigmoid")
LOSSES = ("cross-entropy", "mse")


def activate(name: str, z: np.ndarray) -> None:
    """Apply the activation in place: z <- f(z)."""
    if name == "relu":
        np.maximum(z, 0, out=z)
    elif name == "tanh":
        np.tanh(z, out=z)
    elif name == "sigmoid":
        # 1 / (1 + exp(-z)) written as 0.5 * (1 + tanh(z / 2)): no overflow for large |z|.
        np.multiply(z, 0.5, out=z)
        np.tanh(z, out=z)
        np.add(z, 1, out=z)
        np.multiply(z, 0.5, out=z)
    else:
        raise ValueError(f"unknown activation {name!r}")


def activation_backward(name: str, a: np.ndarray, delta: np.ndarray, scratch: np.ndarray) -> None:
    """Multiply delta in place by f'(z), given a = f(z); scratch has a's shape.

    relu:    f'(z) = 1[z > 0] = 1[a > 0]
    tanh:    f'(z) = 1 - tanh(z)^2 = 1 - a^2
    sigmoid: f'(z) = s(z) (1 - s(z)) = a (1 - a)
    """
    if name == "relu":
        np.greater(a, 0, out=scratch)
    elif name == "tanh":
        np.multiply(a, a, out=scratch)
        np.subtract(1, scratch, out=scratch)
    elif name == "sigmoid":
        np.subtract(1, a, out=scratch)
        np.multiply(scratch, a, out=scratch)
    else:
        raise ValueError(f"unknown activation {name!r}")
    np.multiply(delta, scratch, out=delta)


def softmax_cross_entropy(z: np.ndarray, y: np.ndarray, delta: np.ndarray,
                          losses: np.ndarray) -> float:
    """Summed cross-entropy of softmax(z) against integer labels y (each row's: losses).

    loss = sum_i [ logsumexp(z_i) - z_{i, y_i} ]
    d loss / d z_i = softmax(z_i) - onehot(y_i)      (written into delta)

    Stable for any z: the row maximum is subtracted before exponentiating.
    """
    n = z.shape[0]
    if n == 0:
        return 0.0
    rows = np.arange(n)
    np.subtract(z, z.max(axis=1, keepdims=True), out=delta)  # shifted logits, max 0
    picked = delta[rows, y]  # shifted logit of the true class (a copy)
    np.exp(delta, out=delta)
    total = delta.sum(axis=1, keepdims=True)
    np.log(total[:, 0], out=losses)
    losses -= picked
    loss = float(losses.sum())
    delta /= total  # softmax
    delta[rows, y] -= 1
    return loss


def mean_squared_error(z: np.ndarray, t: np.ndarray, delta: np.ndarray,
                       losses: np.ndarray) -> float:
    """Summed per-sample mean squared error over K outputs (each row's: losses).

    loss = sum_i (1/K) sum_k (z_ik - t_ik)^2
    d loss / d z_ik = (2/K) (z_ik - t_ik)             (written into delta)
    """
    n, k = z.shape
    if n == 0:
        return 0.0
    np.subtract(z, t, out=delta)
    np.einsum("ij,ij->i", delta, delta, out=losses)
    losses *= 1.0 / k
    delta *= 2.0 / k
    loss = float(losses.sum())
    return loss


def one_hot(y: np.ndarray, k: int, out: np.ndarray) -> np.ndarray:
    """Write one-hot rows for integer labels y into out[:len(y)] and return that view."""
    view = out[: len(y)]
    view.fill(0)
    view[np.arange(len(y)), y] = 1
    return view
