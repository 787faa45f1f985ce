"""Issue 9's pieces against independent oracles: dropout masks and their gradient
(finite differences), micro-batch accumulation (the whole batch), L1 and clipping
(closed forms), learning-rate schedules (closed-form values)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_model import assert_gradient_matches

from mpinn.nn.dropout import Dropout, keep_mask
from mpinn.nn.model import MLP, Architecture
from mpinn.nn.optim import SGD
from mpinn.nn.schedule import Schedule, scaled_rate
from mpinn.train.step import clip

pytestmark = pytest.mark.fast  # in-process: the tier of `make test-fast`


def test_a_sample_gets_the_same_mask_wherever_it_is():
    rows = np.array([5, 17, 3, 40_000_000_123])
    whole = keep_mask(7, 11, 1, rows, 64, 0.3)
    for a, b in ((0, 2), (2, 4), (1, 3)):  # any split of the rows (ranks, micro-batches)
        np.testing.assert_array_equal(keep_mask(7, 11, 1, rows[a:b], 64, 0.3), whole[a:b])
    assert (keep_mask(7, 11, 1, rows[::-1], 64, 0.3) == whole[::-1]).all()
    for other in ((7, 12, 1), (7, 11, 0), (8, 11, 1)):  # another step, layer or seed
        assert (keep_mask(*other, rows, 64, 0.3) != whole).mean() > 0.3


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_the_kept_fraction_is_one_minus_p(p):
    kept = keep_mask(1, 0, 0, np.arange(2000), 500, p)
    assert abs(kept.mean() - (1 - p)) < 4 * math.sqrt(p * (1 - p) / kept.size)
    # no structure along units or samples: each row and column keeps about 1 - p
    assert abs(kept.mean(axis=0) - (1 - p)).max() < 0.05
    assert abs(kept.mean(axis=1) - (1 - p)).max() < 0.1


def test_masks_are_scaled_and_preallocated():
    d = Dropout((0.25, 0.0), (6, 4), 7, seed=3, dtype="float64")
    m = d.masks(2, np.arange(7))
    assert m[1] is None and set(np.unique(m[0])) <= {0.0, 1 / 0.75}
    again = d.masks(2, np.arange(7))[0]
    assert again.base is m[0].base  # the same buffer, refilled: nothing allocated per step


def model_and_data(activation: str, n: int = 7, accumulate: bool = False):
    arch = Architecture((5, 6, 4, 3), activation, "cross-entropy", "float64")
    model = MLP(arch, max_rows=n, dropout=True, accumulate=accumulate)
    model.init(np.random.default_rng(1))
    rng = np.random.default_rng(2)
    for b in model.b:
        b[...] = rng.normal(0, 0.3, b.shape)
    return model, rng.normal(size=(n, 5)), rng.integers(0, 3, n)


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_dropout_gradient_matches_central_differences(activation):
    """The mask fixed, backward is the derivative of the masked network's loss."""
    model, x, y = model_and_data(activation)
    masks = Dropout((0.4,), (6, 4), 7, seed=5, dtype="float64").masks(3, np.arange(7))
    assert 0 < (masks[0] == 0).sum() < masks[0].size
    model.forward(x, masks)
    model.backward(y)
    analytic = model.grads.copy()

    def masked_loss() -> float:
        model.forward(x, masks)
        return model.loss(y)
    assert_gradient_matches(model, masked_loss)
    # and the masks matter: without them the gradient is another
    model.forward(x)
    model.backward(y)
    assert np.linalg.norm(model.grads - analytic) > 1e-3 * np.linalg.norm(analytic)


def test_evaluation_has_no_dropout():
    model, x, _ = model_and_data("tanh")
    plain = model.forward(x).copy()
    masks = Dropout((0.5,), (6, 4), 7, seed=5, dtype="float64").masks(0, np.arange(7))
    assert not np.allclose(model.forward(x, masks), plain)
    np.testing.assert_array_equal(model.forward(x), plain)


def test_micro_batches_add_up_to_the_batch():
    model, x, y = model_and_data("sigmoid", accumulate=True)
    model.forward(x)
    model.backward(y)
    whole = model.grads.copy()
    model.grads[:] = 99.0  # the first micro-batch overwrites, the others add
    for k, rows in enumerate((slice(0, 2), slice(2, 2), slice(2, 7))):
        model.forward(x[rows])
        model.backward(y[rows], add=k > 0)
    np.testing.assert_allclose(model.grads, whole, rtol=1e-12, atol=1e-15)


def test_l1_adds_its_subgradient_like_weight_decay():
    params = np.array([0.5, -2.0, 0.0, 3.0])
    grads = np.array([0.1, 0.1, 0.1, 0.1])
    SGD(params, lr=0.1, weight_decay=0.01, l1=0.2).step(grads)
    expected = np.array([0.5, -2.0, 0.0, 3.0]) - 0.1 * (
        0.1 + 0.01 * np.array([0.5, -2.0, 0.0, 3.0]) + 0.2 * np.array([1, -1, 0, 1]))
    np.testing.assert_allclose(params, expected, rtol=1e-15)


def test_clip_scales_to_the_limit_only_above_it():
    g = np.array([3.0, 4.0])
    clip(g, 25.0, 10.0)
    np.testing.assert_array_equal(g, [3.0, 4.0])
    clip(g, 25.0, 2.5)
    np.testing.assert_allclose(g, [1.5, 2.0], rtol=1e-15)
    clip(g, float(g @ g), 0.0)  # 0: off
    np.testing.assert_allclose(g, [1.5, 2.0], rtol=1e-15)


def test_schedules_closed_forms():
    warm = Schedule(0.4, "constant", total=100, warmup=4)
    assert [warm(s) for s in range(5)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4])
    step = Schedule(1.0, "step", total=100, warmup=2, every=10, gamma=0.5)
    assert [step(s) for s in (0, 2, 11, 12, 31, 32)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.5, 0.25, 0.125])
    cos = Schedule(1.0, "cosine", total=22, warmup=2, lr_min=0.1)
    assert cos(1) == 1.0 and cos(2) == 1.0 and cos(21) == pytest.approx(0.1, abs=1e-15)
    assert cos(12) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 10 / 19)))
    assert cos(100) == pytest.approx(0.1)
    assert scaled_rate(0.1, "linear", 1024, 256) == pytest.approx(0.4)
    assert scaled_rate(0.1, "none", 1024, 256) == 0.1


def test_a_longer_resume_stretches_cosine_from_where_it_was():
    cos = Schedule(1.0, "cosine", total=40, warmup=0, lr_min=0.0)
    longer = cos.stretched(20, 100)
    assert longer.anchor == (20, cos(20))
    assert longer(20) == cos(20)  # the rate continues from where it was
    assert longer(60) == pytest.approx(cos(20) * 0.5 * (1 + math.cos(math.pi * 40 / 79)))
    assert longer(99) == pytest.approx(0.0, abs=1e-15)
    assert cos.stretched(20, 40) is cos  # same total: unchanged
    again = longer.stretched(50, 100)  # a second resume at the same total keeps the anchor
    assert [again(s) for s in range(100)] == [longer(s) for s in range(100)]
