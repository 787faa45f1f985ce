"""--reproducible: the same bits on any number of ranks.

In process: the fixed-point products do not depend on how the rows are split, the
grids keep every sum below 2^53, the exact sums (losses, |g|^2) do not depend on
order or split, and the elementwise functions between the products give the same
bits on slices of any length and offset. Through mpiexec: weights and optimizer state
bitwise identical for P = 1, 2, 3, 4, 6, 8 (global shuffle, Adam, dropout, a
validation split with early stopping, a batch several P do not divide), with the other
settings it combines with, through a resume on another P; a value past its grid on
one rank redoes the step on every rank.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction

import h5py
import numpy as np
import pytest

from conftest import expect_error, mpi_script, mpinn, ok
from mpinn.nn import fixed
from mpinn.nn import functional as F
from mpinn.nn.exact import ExactMLP
from mpinn.nn.fixed import Budget
from mpinn.nn.model import MLP, Architecture

ARGS = ("--hidden", "16,8", "--batch-size", 50, "--optimizer", "adam", "--lr", 0.01,
        "--dropout", 0.2, "--val-fraction", 0.2, "--early-stopping", 1, "--seed", 5,
        "--reproducible")
SPLITS = [(0, 37), (37, 38), (38, 90), (90, 100)]  # rows of a batch of 100, unevenly


def exact_model(dtype: str, rows: int = 100) -> ExactMLP:
    arch = Architecture((50, 64, 32, 10), "tanh", "cross-entropy", dtype)
    model = ExactMLP(arch, rows, Budget.plan(arch.sizes, rows), accumulate=True)
    model.init(np.random.default_rng(1))
    x, y = batch(rows)
    model.prepare()  # the grids of the inputs and deltas: from a first pass's maxima
    model.forward(x)
    model.backward(y)
    model.adopt()
    return model


def batch(rows: int = 100) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    return rng.standard_normal((rows, 50)).astype(np.float32), rng.integers(0, 10, rows)


@pytest.mark.fast
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_products_do_not_depend_on_how_the_rows_are_split(dtype):
    """Logits row by row and the summed gradient: the same bits for the whole batch at
    once and for uneven slices added up (micro-batches), float32 and float64 models;
    and within 1e-5 of the floating-point model (the grids' precision)."""
    x, y = batch()
    whole, split = exact_model(dtype), exact_model(dtype)
    whole.prepare()
    logits = whole.forward(x).copy()
    whole.backward(y)
    split.prepare()
    for k, (lo, hi) in enumerate(SPLITS):
        assert (split.forward(x[lo:hi]) == logits[lo:hi]).all(), (lo, hi)
        split.backward(y[lo:hi], add=k > 0)
    assert (split.grads == whole.grads).all() and whole.grads.dtype == np.float64
    assert whole.fits() and (whole.seen == split.seen).all()
    plain = MLP(whole.arch, 100)
    plain.params[:] = whole.params
    plain.forward(x)
    plain.backward(y)
    error = np.linalg.norm(plain.grads - whole.grads) / np.linalg.norm(plain.grads)
    assert error < (1e-5 if dtype == "float64" else 1e-4), error


@pytest.mark.fast
def test_a_value_past_its_grid_is_saturated_and_seen():
    """An input above its grid's headroom: saturated at 2^bits (the products stay exact:
    still the same bits for any split) and its exponent noted, so fits() says no."""
    x, y = batch()
    x[40, 3] = 1e3  # the batch's inputs are below 2^3: up to 2^4 fits
    model = exact_model("float64")
    model.prepare()
    logits = model.forward(x).copy()
    assert not model.fits() and model.seen[0] == math.frexp(1e3)[1]
    again = exact_model("float64")
    again.prepare()
    for lo, hi in SPLITS:
        assert (again.forward(x[lo:hi]) == logits[lo:hi]).all()
    model.adopt()
    model.prepare()
    model.forward(x)
    assert model.fits(), "the next attempt, on grids from this one's maxima, fits"


@pytest.mark.fast
def test_evaluation_puts_each_row_on_its_own_grid():
    """Inputs of 0-255 (raw pixels) on grids that never saw them (a fresh model's): an
    evaluation's forward is neither clipped (within 1e-5 of the floating-point logits)
    nor different for any split of the rows."""
    x, _ = batch()
    x = np.abs(x) * 80
    model = exact_model("float64")
    model.grid_e[:] = 0
    model.prepare(evaluation=True)
    logits = model.forward(x).copy()
    for lo, hi in SPLITS:
        assert (model.forward(x[lo:hi]) == logits[lo:hi]).all()
    plain = MLP(model.arch, 100)
    plain.params[:] = model.params
    expected = plain.forward(x)
    assert np.abs(logits - expected).max() < 1e-5 * np.abs(expected).max()


@pytest.mark.fast
def test_a_step_with_bad_input_keeps_its_grids():
    """A rank with a non-finite row hides its maxima from the MAX: the step is not
    applied, and its grids are not adopted either (they would depend on P)."""
    from mpi4py import MPI

    from mpinn.comm import world
    from mpinn.comm.gradsync import GradientSync
    from mpinn.data.feed import Batch
    from mpinn.data.layout import DatasetInfo, Problem
    from mpinn.nn.optim import make_optimizer
    from mpinn.train.step import Learner, train_step
    from mpinn.train.timing import PhaseTimer
    arch = Architecture((50, 64, 32, 10), "tanh", "cross-entropy", "float64")
    world.start()  # (importing mpinn.comm never starts MPI)
    sync = GradientSync(MPI.COMM_SELF, arch.n_params, arch.dtype, exact=6)
    model = ExactMLP(arch, 100, Budget.plan(arch.sizes, 100), seen=sync.extremes[:-1],
                     grads=sync.grads)
    model.init(np.random.default_rng(1))
    learner = Learner(model, make_optimizer("adam", model.params, 1e-3, 0.0, 0.0), sync,
                      Problem(DatasetInfo("-", 100, 0, 50, "classification", 10), 10))
    x, y = batch()
    good = Batch.in_memory(x, y, 100)
    assert train_step(learner, good, PhaseTimer()).applied
    grids, params = model.grid_e.copy(), model.params.copy()
    x = x.copy()
    x[3, 3] = np.nan
    bad = good._replace(x=x, bad="row 3 is not finite")
    assert not train_step(learner, bad, PhaseTimer()).applied
    assert (model.grid_e == grids).all() and (model.params == params).all()


@pytest.mark.fast
@pytest.mark.parametrize("sizes, batch_rows", [((784, 1024, 1024, 10), 4096),
                                               ((50, 64, 32, 10), 100), ((3, 1), 1),
                                               ((20000, 30000, 5), 2**20)])
def test_the_budget_keeps_every_sum_below_2_53(sizes, batch_rows):
    budget = Budget.plan(sizes, batch_rows)
    for i, (k_in, k_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        a, d, w = budget.act[i], budget.delta[i], budget.weight[i]
        assert a + w + fixed.lg(k_in) <= 53 and d + w + fixed.lg(k_out) <= 53
        assert a + d + fixed.lg(batch_rows) <= 53 and min(a, d, w) >= fixed.MIN_BITS
    assert "layer 1: a" in budget.describe()


@pytest.mark.fast
def test_a_batch_too_large_for_the_grids_is_refused(cli, synth):
    result = cli("train", synth, "--out", "never", "--reproducible", "--batch-size",
                 2**40, "--epochs", 1)
    expect_error(result, 2, "--reproducible", "fewer than 8 bits", "--batch-size")


@pytest.mark.fast
@pytest.mark.parametrize("flag, words", [(("--sync-dtype", "bfloat16"), ("--sync-dtype",
                                                                         "model")),
                                         (("--shuffle", "block"), ("--shuffle", "feistel"))])
def test_settings_that_depend_on_p_are_refused(cli, synth, flag, words):
    result = cli("train", synth, "--out", "never", "--reproducible", *flag)
    expect_error(result, 2, "--reproducible (reproducible)", *words)


@pytest.mark.fast
def test_exact_sums_are_exact_and_order_free():
    """Losses: the limbs of any split, summed, give the exactly rounded sum of the rows'
    values (each on a grid of 2^-64); |g|^2's two parts, of any split, the same bits."""
    rng = np.random.default_rng(3)
    values = np.exp(rng.standard_normal(1001) * 8)  # 1e-14 .. 1e14
    exact = sum(Fraction(round(Fraction(v) * 2**64), 2**64) for v in values.tolist())
    for cuts in ([1001], [1, 500, 1001], list(range(7, 1001, 7)) + [1001]):
        limbs, lo = np.zeros(fixed.LIMBS), 0
        for hi in cuts:
            part = np.zeros(fixed.LIMBS)
            fixed.to_limbs(fixed.exact_int(values[lo:hi]), part)
            limbs += part
            lo = hi
        assert fixed.from_limbs(limbs) == float(exact)
    assert fixed.exact_int(np.array([1.0, np.nan])) is None
    nan = np.zeros(fixed.LIMBS)
    fixed.to_limbs(None, nan)
    assert math.isnan(fixed.from_limbs(nan))
    g = rng.standard_normal(200_003) * 1e-3
    top = fixed.exponent(g)
    scratch = np.zeros(2 * 4096)
    whole, parts = np.zeros(2), np.zeros(2)
    fixed.square_parts(g, top, len(g), scratch, whole)
    for lo, hi in ((0, 77_777), (77_777, 200_003)):
        part = np.zeros(2)
        fixed.square_parts(g[lo:hi], top, len(g), scratch, part)
        parts += part
    assert (parts == whole).all()
    truth = math.fsum(Fraction(v) ** 2 for v in g.tolist())
    assert abs(fixed.square_value(whole, top, len(g)) - float(truth)) <= 1e-12 * float(truth)


def slices(n: int):
    """(offset, length) pairs: offsets 0-39, lengths 1-513 (strided through)."""
    return [(off, length) for off in range(40) for length in range(1 + off % 7, 514, 37)
            if off + length <= n]


@pytest.mark.fast
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_elementwise_functions_give_the_same_bits_on_any_slice(dtype):
    """What lies between the exact products: NumPy's exp, log, tanh, expm1, log1p, sqrt,
    row sums and maxima, the activations and their derivatives, the per-row losses.
    A slice (any offset, any length, also strided) gives the bits of the whole. Another
    CPU's SIMD tails could differ: this is the assumption --reproducible rests on."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((600, 11)).astype(dtype)
    positive = np.abs(x) + 0.5
    whole = {"exp": np.exp(x), "log": np.log(positive), "tanh": np.tanh(x),
             "expm1": np.expm1(x), "log1p": np.log1p(positive), "sqrt": np.sqrt(positive),
             "rowsum": x.sum(axis=1), "rowmax": x.max(axis=1)}
    labels = rng.integers(0, 11, 600)
    losses, deltas = np.zeros(600, dtype), np.zeros_like(x)
    F.softmax_cross_entropy(x, labels, deltas, losses)
    for off, length in slices(600):
        s = slice(off, off + length)
        part = {"exp": np.exp(x[s]), "log": np.log(positive[s]), "tanh": np.tanh(x[s]),
                "expm1": np.expm1(x[s]), "log1p": np.log1p(positive[s]),
                "sqrt": np.sqrt(positive[s]), "rowsum": x[s].sum(axis=1),
                "rowmax": x[s].max(axis=1)}
        for name, value in part.items():
            assert (value == whole[name][s]).all(), (name, off, length)
        d, row = np.zeros_like(x[s]), np.zeros(length, dtype)
        F.softmax_cross_entropy(x[s], labels[s], d, row)
        assert (row == losses[s]).all() and (d == deltas[s]).all(), (off, length)
        for name in F.ACTIVATIONS:
            z = x[s].copy()
            F.activate(name, z)
            full = x.copy()
            F.activate(name, full)
            assert (z == full[s]).all(), (name, off, length)
    strided = x[::3, ::2]
    assert (np.tanh(strided) == np.tanh(x)[::3, ::2]).all()
    flat = x.ravel()
    for off in range(1, 40):
        assert (np.exp(flat[off:]) == np.exp(flat)[off:]).all(), off


def optimizer_state(run) -> dict[str, np.ndarray]:
    with h5py.File(run / "checkpoint.h5", "r") as f:
        return {k: f["optimizer"][k][...] for k in f["optimizer"]} | {
            k: f["model"][k][...] for k in f["model"]}


def assert_same_bits(a, b) -> None:
    sa, sb = optimizer_state(a), optimizer_state(b)
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].tobytes() == sb[k].tobytes(), (a.name, b.name, k)


def test_the_same_bits_on_any_number_of_ranks(synth, tmp_path):
    """P = 1, 2, 3, 4, 6, 8 (50 rows a step: 3, 4, 6 and 8 do not divide it), global
    shuffle, Adam, dropout, a validation split with early stopping: weights, Adam's
    state, the grids and every epoch's losses alike, bit for bit."""
    runs = {}
    for n in (1, 2, 3, 4, 6, 8):
        runs[n] = tmp_path / f"p{n}"
        ok(mpinn(n, "train", synth, "--out", runs[n], "--epochs", 4, *ARGS, timeout=300))
    lines = {n: (r / "metrics.jsonl").read_text().splitlines() for n, r in runs.items()}
    for n in runs:
        assert_same_bits(runs[1], runs[n])
        strip = [{k: v for k, v in json.loads(line).items()
                  if k not in ("seconds", "samples_per_s")} for line in lines[n]]
        assert strip == [{k: v for k, v in json.loads(line).items()
                          if k not in ("seconds", "samples_per_s")} for line in lines[1]], n


@pytest.mark.parametrize("extra", [
    ("--shuffle", "feistel", "--accumulate", 3, "--clip-norm", 0.05),
    ("--shard-optimizer", "--clip-norm", 0.05, "--sync", "blocking", "--dtype", "float64"),
    ("--loss", "mse", "--activation", "sigmoid", "--optimizer", "momentum")],
    ids=["feistel-accumulate-clip", "shard-clip-blocking-float64", "mse-momentum"])
def test_it_combines_with_the_other_settings(synth, tmp_path, extra):
    for n in (1, 3, 4):
        ok(mpinn(n, "train", synth, "--out", tmp_path / f"p{n}", "--epochs", 2, *ARGS,
                 *extra, timeout=300))
    for n in (3, 4):
        assert_same_bits(tmp_path / "p1", tmp_path / f"p{n}")


def test_a_resume_on_another_p_continues_the_same_bits(synth, tmp_path):
    ok(mpinn(1, "train", synth, "--out", tmp_path / "whole", "--epochs", 3, *ARGS,
             "--early-stopping", 0))
    ok(mpinn(2, "train", synth, "--out", tmp_path / "a", "--epochs", 1, *ARGS,
             "--early-stopping", 0))
    ok(mpinn(3, "train", "--out", tmp_path / "a", "--resume", "--epochs", 3))
    assert_same_bits(tmp_path / "whole", tmp_path / "a")
    expect_error(mpinn(2, "train", "--out", tmp_path / "a", "--resume", "--epochs", 4,
                       "--no-reproducible"), 2, "--reproducible (reproducible) True -> False")
    shown = ok(mpinn(None, "data", "inspect", tmp_path / "a" / "checkpoint.h5")).stdout
    assert "reproducible: yes" in shown and "written by 3 ranks" in shown, shown
    shown = ok(mpinn(None, "data", "inspect", tmp_path / "whole" / "checkpoint.h5")).stdout
    assert "reproducible: yes" in shown


@pytest.mark.parametrize("n", [1, 3])
def test_a_value_past_its_grid_redoes_the_step_on_every_rank(tmp_path, n):
    """One row, held by the last rank, jumps 64-fold at step 3: that rank alone meets it,
    every rank redoes the step (the same count everywhere), and the weights are those
    of one rank's run."""
    out = {k: tmp_path / f"redo{k}.npz" for k in (1, n)}
    for k in out:
        ok(mpi_script(k, "reproducible_redo.py", out[k]))
    one, many = np.load(out[1]), np.load(out[n])
    assert int(many["spike"]) >= 1 and int(many["redos"]) == int(one["redos"])
    assert many["params"].tobytes() == one["params"].tobytes()
    assert many["m"].tobytes() == one["m"].tobytes()


def test_without_it_the_last_bits_differ(synth, tmp_path):
    """The control: the same runs without --reproducible differ between P = 1 and 3 (so
    the test above can tell), and the summary counts the redos with it."""
    plain = [a for a in ARGS if a != "--reproducible"]
    for n in (1, 3):
        ok(mpinn(n, "train", synth, "--out", tmp_path / f"p{n}", "--epochs", 2, *plain))
    a, b = optimizer_state(tmp_path / "p1"), optimizer_state(tmp_path / "p3")
    assert any(a[k].tobytes() != b[k].tobytes() for k in a)
    summary = json.loads((tmp_path / "p3" / "summary.json").read_text())
    assert summary["reproducible"] is False and summary["redone_steps"] is None
    ok(mpinn(2, "train", synth, "--out", tmp_path / "r", "--epochs", 1, *ARGS))
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["reproducible"] is True and summary["redone_steps"] >= 1  # step 1's


def test_bench_step_reports_the_reproducible_step(tmp_path):
    """--reproducible against the normal step on the same rows, phase by phase; the
    reproducible sync sends float64 plus the loss's limbs; refused with a half-precision
    wire."""
    out = tmp_path / "step.json"
    result = ok(mpinn(2, "bench", "step", "--features", 64, "--hidden", "128", "--batch-size",
                      64, "--steps", 5, "--reproducible", "--json", out))
    report = json.loads(out.read_text())["reproducible"]
    assert report["vs_normal"] > 0 and report["grids_s"] > 0
    assert set(report["phase_vs_normal"]) >= {"forward", "backward", "allreduce", "update"}
    assert report["redone_steps"] >= 1 and "layer 1: a" in report["bits"]  # the first step
    assert "x the normal step" in result.stdout
    expect_error(mpinn(1, "bench", "step", "--reproducible", "--sync-dtype", "float16"), 2,
                 "--reproducible", "float16")
