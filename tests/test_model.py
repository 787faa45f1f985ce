"""The model and optimizers against independent oracles: finite differences, closed forms."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mpinn.nn import functional as F
from mpinn.nn import model as model_module
from mpinn.nn.model import MLP, Architecture
from mpinn.nn.optim import SGD, Adam, Momentum

pytestmark = pytest.mark.fast  # in-process: the tier of `make test-fast`

CASES = list(itertools.product(F.ACTIVATIONS, F.LOSSES))


def problem(activation: str, loss: str, targets: str = "labels", n: int = 7):
    arch = Architecture((5, 6, 4, 3), activation, loss, "float64")
    model = MLP(arch, max_rows=n)
    model.init(np.random.default_rng(1))
    rng = np.random.default_rng(2)
    for b in model.b:  # non-zero biases so every term of the gradient is exercised
        b[...] = rng.normal(0, 0.3, b.shape)
    x = rng.normal(size=(n, 5))
    y = rng.normal(size=(n, 3)) if targets == "regression" else rng.integers(0, 3, n)
    return model, x, y


def summed_loss(model: MLP, x, y) -> float:
    model.forward(x)
    return model.loss(y)


@pytest.mark.parametrize("activation,loss", CASES + [(a, "mse-regression") for a in F.ACTIVATIONS])
def test_gradient_matches_central_differences(activation, loss):
    targets = "regression" if loss == "mse-regression" else "labels"
    model, x, y = problem(activation, loss.replace("-regression", ""), targets)
    model.forward(x)
    model.backward(y)
    # relu's kink: no sample sits within h of it for this data (checked by the tolerance)
    assert_gradient_matches(model, lambda: summed_loss(model, x, y))


def assert_gradient_matches(model, loss, h: float = 1e-6) -> None:
    """model.grads (after backward) against central differences of loss() in every
    parameter, 1e-7 relative."""
    analytic = model.grads.copy()
    numeric = np.zeros_like(analytic)
    for i in range(model.params.size):
        saved = model.params[i]
        model.params[i] = saved + h
        up = loss()
        model.params[i] = saved - h
        down = loss()
        model.params[i] = saved
        numeric[i] = (up - down) / (2 * h)
    rel = np.linalg.norm(analytic - numeric) / np.linalg.norm(analytic + numeric)
    assert rel <= 1e-7, rel


def test_zero_rows_give_zero_gradients():
    model, x, y = problem("tanh", "cross-entropy")
    model.grads[:] = 123.0
    model.forward(x[:0])
    assert model.backward(y[:0]) == 0.0
    assert not model.grads.any()


def test_gradient_is_a_sum_over_rows():
    """backward() sums per-sample gradients: rows split in two add up to the whole."""
    model, x, y = problem("sigmoid", "cross-entropy")
    model.forward(x)
    total_loss = model.backward(y)
    whole = model.grads.copy()
    parts, loss_parts = np.zeros_like(whole), 0.0
    for rows in (slice(0, 3), slice(3, None)):
        model.forward(x[rows])
        loss_parts += model.backward(y[rows])
        parts += model.grads
    np.testing.assert_allclose(parts, whole, rtol=1e-12, atol=1e-14)
    assert loss_parts == pytest.approx(total_loss, rel=1e-12)


def test_cross_entropy_is_stable_for_huge_logits():
    z = np.array([[1000.0, 0.0, -1000.0], [0.0, 1e4, 0.0]])
    delta, losses = np.empty_like(z), np.empty(2)
    loss = F.softmax_cross_entropy(z, np.array([0, 0]), delta, losses)
    assert np.isfinite(loss) and loss == pytest.approx(1e4)
    np.testing.assert_allclose(losses, [0, 1e4])
    np.testing.assert_allclose(delta, [[0, 0, 0], [-1, 1, 0]], atol=1e-12)


def test_parameter_views_share_the_flat_buffers():
    model = MLP(Architecture((3, 4, 2)), max_rows=1)
    assert model.params.size == 3 * 4 + 4 + 4 * 2 + 2 == model.arch.n_params
    model.params[:] = np.arange(model.params.size)
    assert model.W[0].shape == (3, 4) and model.W[1].shape == (4, 2)
    assert model.W[0][0, 1] == 1 and model.b[0][0] == 12 and model.W[1][0, 0] == 16
    for view in model.W + model.b:
        assert np.shares_memory(view, model.params)
    for view in model.dW + model.db:
        assert np.shares_memory(view, model.grads)
    assert model.arch.layer_ranges() == [(0, 16), (16, 26)]


def test_init_is_a_function_of_the_generator_only():
    a = MLP(Architecture((8, 16, 3), dtype="float32"), 4)
    b = MLP(Architecture((8, 16, 3), dtype="float64"), 4)
    a.init(np.random.default_rng(5))
    b.init(np.random.default_rng(5))
    np.testing.assert_array_equal(a.params, b.params.astype(np.float32))
    # He normal for relu: weight variance close to 2 / fan_in
    big = MLP(Architecture((400, 300, 2)), 1)
    big.init(np.random.default_rng(0))
    assert big.W[0].var() == pytest.approx(2 / 400, rel=0.02)


def test_sgd_momentum_adam_closed_forms():
    g = np.array([0.5, -2.0, 0.0])
    w = np.array([1.0, 1.0, 1.0])
    sgd = SGD(w.copy(), lr=0.1, weight_decay=0.01)
    sgd.step(g.copy())
    np.testing.assert_allclose(sgd.params, w - 0.1 * (g + 0.01 * w))

    mom = Momentum(w.copy(), lr=0.1, momentum=0.9)
    mom.step(g.copy())
    mom.step(g.copy())  # v1 = g, v2 = 0.9 g + g
    np.testing.assert_allclose(mom.params, w - 0.1 * g - 0.1 * 1.9 * g)

    adam = Adam(w.copy(), lr=0.01)
    adam.step(g.copy())  # first step: m_hat = g, v_hat = g^2 -> step lr * g / (|g| + eps)
    np.testing.assert_allclose(adam.params, w - 0.01 * g / (np.abs(g) + 1e-8))
    adam.step(g.copy())
    assert int(adam.t) == 2
    np.testing.assert_allclose(adam.params, w - 0.02 * g / (np.abs(g) + 1e-8), rtol=1e-6)


def test_optimizer_steps_do_not_reallocate():
    w = np.ones(10)
    for opt in (SGD(w, 0.1, 0.1), Momentum(w, 0.1, 0.1), Adam(w, 0.1, 0.1)):
        before = [a.__array_interface__["data"][0] for a in (opt.params, *opt.state().values())]
        opt.step(np.full(10, 0.5))
        after = [a.__array_interface__["data"][0] for a in (opt.params, *opt.state().values())]
        assert before == after
        assert opt.params is w


@pytest.mark.parametrize("sizes", [(784, 1024, 1024, 10), (3000, 700, 5), (2, 3, 2),
                                   (1, 5, 3)])
def test_weight_panels_tile_each_layer_and_shrink_toward_the_end(sizes):
    """Each layer's dW panels tile its rows in order, none over PANEL_ELEMENTS outputs
    (or one row); the first layer's (computed last, row 0 last) start from a panel of at
    most TAIL_ELEMENTS at row 0, the smallest, so the message left after backward is
    small; the other layers' are equal, to a row."""
    arch = Architecture(sizes)
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        panels = arch.panels(i)
        assert panels[0][0] == 0 and panels[-1][1] == fan_in
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(panels, panels[1:]))
        outputs = [(hi - lo) * fan_out for lo, hi in panels]
        assert max(outputs) <= max(fan_out, model_module.PANEL_ELEMENTS)
        if i == 0:
            assert outputs[0] == min(outputs)
            assert outputs[0] <= max(fan_out, model_module.TAIL_ELEMENTS) or len(panels) == 1
        else:
            assert max(outputs) - min(outputs) <= fan_out


def test_weight_panels_at_the_edges():
    """The shapes the docs name, and the corners: one row, a row over the cap, a small
    top panel joining the one before (in halves when together they pass the cap)."""
    panels = model_module.panels
    assert panels(784, 1024, True) == ((0, 64), (64, 192), (192, 448), (448, 784))
    assert panels(1024, 1024, False) == ((0, 512), (512, 1024))
    assert panels(1, 1024, True) == ((0, 1),)
    assert panels(3, 1 << 20, True) == panels(3, 1 << 20, False) == ((0, 1), (1, 2), (2, 3))
    assert panels(200, 1024, True) == ((0, 64), (64, 200))  # 8 rows over 192: joined
    assert panels(1024, 1024, True)[-2:] == ((448, 736), (736, 1024))  # 512 + 64 halved


def test_backward_reports_a_growing_final_tail_through_its_panels():
    """With hooks, every panel runs through compute() (each delta passed down in one
    product) and ready() extends the final part of the gradient from the end to 0,
    contiguously; the gradient equals backward()'s without hooks bit for bit (the same
    panels), and the first layer's dW, in 2 panels, equals x^T delta_0 in one product."""
    arch = Architecture((300, 500, 400, 3), dtype="float64")
    rows = 300  # (a delta of 300 x 500 is more than one panel's outputs)
    model = MLP(arch, max_rows=rows)
    model.init(np.random.default_rng(3))
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(rows, 300)), rng.integers(0, 3, rows)
    model.forward(x)
    model.backward(y)
    plain = model.grads.copy()
    assert len(arch.panels(0)) == 2
    np.testing.assert_allclose(model.dW[0], x.T @ model._deltas[0][:rows], rtol=1e-12,
                               atol=1e-12)

    class Hooks:
        front, computed = arch.n_params, 0

        def ready(self, start, stop):
            assert stop == self.front and start < stop
            self.front = start

        def compute(self, work):
            self.computed += 1
            work()

    hooks = Hooks()
    model.grads[:] = np.nan
    model.forward(x)
    model.backward(y, hooks=hooks)
    assert hooks.front == 0
    assert hooks.computed == sum(len(arch.panels(i)) for i in range(3)) + 2  # + 2 deltas
    np.testing.assert_array_equal(model.grads, plain)
