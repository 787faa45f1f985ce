"""Optimizers on the flat parameter and gradient vectors, updated in place.

Each optimizer sees the already averaged gradient g = (1/B) sum_i grad loss_i
(the Allreduce and the division happen in train/step.py). L2 weight decay lambda is
added to the gradient: g <- g + lambda w, i.e. the loss gets (lambda/2)|w|^2;
L1 strength mu adds mu sign(w), the subgradient of mu |w|_1 (sign(0) = 0). Both
act on every parameter, biases included. The rate `lr` is an attribute the
training loop sets before every step (schedule.py).
All state is preallocated flat arrays, so step() allocates nothing.
"""

from __future__ import annotations

import math

import numpy as np

OPTIMIZERS = ("sgd", "momentum", "adam")


class Optimizer:
    """Base class: step(grads) updates params in place; state() is for checkpoints."""

    def __init__(self, params: np.ndarray, lr: float, weight_decay: float = 0.0,
                 l1: float = 0.0) -> None:
        self.params = params
        self.lr = lr
        self.weight_decay = weight_decay
        self.l1 = l1
        self._scratch = np.zeros_like(params)

    def _decay(self, grads: np.ndarray) -> None:
        if self.weight_decay:
            np.multiply(self.params, self.weight_decay, out=self._scratch)
            grads += self._scratch
        if self.l1:
            np.sign(self.params, out=self._scratch)
            self._scratch *= self.l1
            grads += self._scratch

    def step(self, grads: np.ndarray) -> None:
        raise NotImplementedError

    def state(self) -> dict[str, np.ndarray]:
        """Arrays (and 0-d arrays for counters) that restore the optimizer exactly."""
        return {}

    @property
    def nbytes(self) -> int:
        """Its own arrays: the state and the scratch array."""
        return sum(v.nbytes for v in self.state().values()) + self._scratch.nbytes

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        for name, value in state.items():
            getattr(self, name)[...] = value


class SGD(Optimizer):
    """w <- w - lr g"""

    def step(self, grads: np.ndarray) -> None:
        self._decay(grads)
        np.multiply(grads, self.lr, out=self._scratch)
        self.params -= self._scratch


class Momentum(Optimizer):
    """Heavy ball: v <- mu v + g;  w <- w - lr v   (v starts at 0)."""

    def __init__(self, params: np.ndarray, lr: float, weight_decay: float = 0.0,
                 momentum: float = 0.9, l1: float = 0.0) -> None:
        super().__init__(params, lr, weight_decay, l1)
        self.momentum = momentum
        self.velocity = np.zeros_like(params)

    def step(self, grads: np.ndarray) -> None:
        self._decay(grads)
        self.velocity *= self.momentum
        self.velocity += grads
        np.multiply(self.velocity, self.lr, out=self._scratch)
        self.params -= self._scratch

    def state(self) -> dict[str, np.ndarray]:
        return {"velocity": self.velocity}


class Adam(Optimizer):
    """Adam (Kingma & Ba), t counting from 1:

        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
        w <- w - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    """

    def __init__(self, params: np.ndarray, lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 l1: float = 0.0) -> None:
        super().__init__(params, lr, weight_decay, l1)
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.m = np.zeros_like(params)
        self.v = np.zeros_like(params)
        self.t = np.zeros((), np.int64)

    def step(self, grads: np.ndarray) -> None:
        self._decay(grads)
        self.t += 1
        t = int(self.t)
        self.m *= self.beta1
        np.multiply(grads, 1 - self.beta1, out=self._scratch)
        self.m += self._scratch
        self.v *= self.beta2
        np.multiply(grads, grads, out=self._scratch)
        self._scratch *= 1 - self.beta2
        self.v += self._scratch
        # scratch <- sqrt(v_hat) + eps, then m_hat / scratch, then the step
        np.sqrt(self.v, out=self._scratch)
        self._scratch *= 1 / math.sqrt(1 - self.beta2 ** t)  # a Python float: no cast buffer
        self._scratch += self.eps
        np.divide(self.m, self._scratch, out=self._scratch)
        self._scratch *= self.lr / (1 - self.beta1 ** t)
        self.params -= self._scratch

    def state(self) -> dict[str, np.ndarray]:
        return {"m": self.m, "v": self.v, "t": self.t}


def make_optimizer(name: str, params: np.ndarray, lr: float, weight_decay: float,
                   momentum: float, l1: float = 0.0) -> Optimizer:
    """The optimizer called `name` (one of OPTIMIZERS) over params."""
    if name == "sgd":
        return SGD(params, lr, weight_decay, l1)
    if name == "momentum":
        return Momentum(params, lr, weight_decay, momentum, l1)
    if name == "adam":
        return Adam(params, lr, weight_decay, l1=l1)
    raise ValueError(f"unknown optimizer {name!r}")
