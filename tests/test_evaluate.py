"""`mpinn evaluate` in-process: the validation rows a run held out (--split val), the
model a run directory means (best.h5 if the run kept one) and which one it scored, and
`--json -`. The 2-rank check against 1 rank is in test_validation.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_validation import held_out, oracle_scores

from conftest import expect_error, ok, probed, strict_json_lines, write_synth
from mpinn.nn.model import MLP
from mpinn.run import checkpoint

pytestmark = pytest.mark.fast  # in-process: the tier of `make test-fast`

VAL = ["--hidden", "8", "--dtype", "float64", "--batch-size", 50, "--epochs", 2,
       "--seed", 7, "--val-fraction", 0.2, "--progress", "off"]
# overfits the 300 training rows left of synth's 600 (test_validation.py's EARLY): the
# validation loss is lowest after a few epochs, then rises, and patience 3 ends the run
EARLY = ["--hidden", "64,64", "--dtype", "float64", "--batch-size", 50, "--epochs", 30,
         "--optimizer", "adam", "--lr", 0.05, "--seed", 7, "--val-fraction", 0.5,
         "--early-stopping", 3, "--progress", "off"]


def oracle_loss(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    """Mean softmax cross-entropy of a checkpoint's ReLU MLP, in plain NumPy."""
    return oracle_scores(checkpoint.load(str(path)).weights, x, y)[0]


@pytest.fixture(autouse=True, scope="module")
def trusted(synth) -> None:
    probed(synth)  # written by mpinn: no probe process (a fast test starts none)


@pytest.fixture(scope="module")
def val_run(synth, trusted, tmp_path_factory) -> Path:
    """A 1-rank run that held out 20% of synth's training rows."""
    from mpinn.cli.main import main
    out = tmp_path_factory.mktemp("val") / "run"
    assert main(["train", str(synth), "--out", str(out), *map(str, VAL)]) == 0
    return out


def scored(result) -> dict:
    """The JSON of `evaluate ... --json -`: standard output holds it and nothing else."""
    return json.loads(ok(result).stdout)


def test_split_val_scores_the_rows_the_run_held_out(cli, val_run, synth):
    got = scored(cli("evaluate", val_run / "checkpoint.h5", synth, "--split", "val",
                     "--json", "-"))
    with h5py.File(synth, "r") as f:
        rows = held_out(7, f["train/y"].shape[0], 0.2)
        x, y = f["train/x"][...][rows], f["train/y"][...][rows]
    assert (got["split"], got["rows"], got["val_fraction"], got["seed"]) == ("val", 120, 0.2, 7)
    assert got["loss"] == pytest.approx(oracle_loss(val_run / "checkpoint.h5", x, y), rel=1e-12)
    # the validation scores training reported for its last epoch, which is this checkpoint
    last = strict_json_lines(val_run / "metrics.jsonl")[-1]
    assert got["loss"] == pytest.approx(last["val_loss"], rel=1e-12)
    assert got["accuracy"] == last["val_accuracy"]
    text = ok(cli("evaluate", val_run / "checkpoint.h5", synth, "--split", "val")).stdout
    assert "val: 120 rows held out by the run (val_fraction 0.2, seed 7)" in text


def rewritten(source: Path, target: Path, config: str) -> Path:
    """A copy of a checkpoint whose configuration is `config` (sealed anew)."""
    ckpt = checkpoint.load(str(source))
    model = MLP(ckpt.arch, 1)
    ckpt.restore(model)
    target.write_bytes(checkpoint.image(dataclasses.replace(ckpt, config=config), model))
    return target


def test_split_val_is_refused_without_held_out_rows(cli, val_run, synth, tmp_path):
    plain = tmp_path / "plain"
    ok(cli("train", synth, "--out", plain, "--hidden", "8", "--epochs", 0))
    expect_error(cli("evaluate", plain, synth, "--split", "val"), 2, "--split val",
                 "held out no validation rows", "--val-fraction")
    # a checkpoint that does not say which rows its run held out
    config = (val_run / "config.toml").read_text()
    before = "\n".join(line for line in config.splitlines() if not line.startswith("val_"))
    for name, text in (("old.h5", before), ("bare.h5", "")):
        ckpt = rewritten(val_run / "checkpoint.h5", tmp_path / name, text)
        expect_error(cli("evaluate", ckpt, synth, "--split", "val"), 2,
                     f"--split val: {ckpt} does not record which rows its run held out")
    # another file than the one the run split: its held-out rows are not these
    other = probed(write_synth(tmp_path / "other.h5", samples=500, test_samples=20, features=12,
                        classes=4, seed=1))
    expect_error(cli("evaluate", val_run, other, "--split", "val"), 2,
                 "has 500 training rows", "of 600", str(synth))


def test_a_run_directory_means_its_best_model_and_says_so(cli, synth, tmp_path):
    out = tmp_path / "stopped"
    trained = ok(cli("train", synth, "--out", out, *EARLY)).stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early"] and "early stopping after epoch" in trained
    lines = [line for line in trained.splitlines() if line.startswith("epoch ")]
    assert lines and all(line.index(" train loss ") < line.index(" val loss ")
                         < line.index(" test loss ") for line in lines)
    records = strict_json_lines(out / "metrics.jsonl")
    best = records[summary["best_epoch"] - 1]
    result = ok(cli("evaluate", out, synth))
    first = result.stdout.splitlines()[0]
    assert first == (f"model: {out / 'best.h5'} (epoch {best['epoch']}, step {best['step']}: "
                     f"the run's lowest validation loss; its newest model is "
                     f"{out / 'checkpoint.h5'})")
    assert f"loss {best['test_loss']:.6f}" in result.stdout
    got = scored(cli("evaluate", out, synth, "--json", "-"))
    assert (got["model"], got["checkpoint"], got["checkpoint_epoch"]) == (
        "best", str(out / "best.h5"), best["epoch"])
    assert got["loss"] == pytest.approx(best["test_loss"], rel=1e-12)
    # a file given is the file scored, and said so: here the final model, not the best
    final = scored(cli("evaluate", out / "checkpoint.h5", synth, "--json", "-"))
    assert (final["model"], final["checkpoint"], final["checkpoint_epoch"]) == (
        "given", str(out / "checkpoint.h5"), len(records))
    assert final["loss"] == pytest.approx(records[-1]["test_loss"], rel=1e-12)
    assert best["epoch"] < len(records) and final["loss"] != got["loss"]
    text = ok(cli("evaluate", out / "checkpoint.h5", synth)).stdout.splitlines()[0]
    assert text.endswith("the checkpoint file given)")


def test_a_run_without_best_h5_means_its_newest_checkpoint(cli, synth, tmp_path):
    out = tmp_path / "plain"
    ok(cli("train", synth, "--out", out, "--hidden", "8", "--epochs", 1, "--progress", "off"))
    got = scored(cli("evaluate", out, synth, "--json", "-"))
    assert (got["model"], got["checkpoint"]) == ("newest", str(out / "checkpoint.h5"))
    line = ok(cli("evaluate", out, synth)).stdout.splitlines()[0]
    assert line == f"model: {out / 'checkpoint.h5'} (epoch 1, step 5: the run's newest checkpoint)"


def test_json_dash_is_standard_output_and_the_text_goes_to_stderr(cli, val_run, synth, tmp_path):
    result = ok(cli("evaluate", val_run, synth, "--json", "-"))
    got = json.loads(result.stdout)  # the whole of stdout is one JSON document
    assert got["split"] == "test" and got["rows"] == 150
    assert result.stderr.startswith("model: ") and "test: 150 rows" in result.stderr
    assert not (tmp_path / "-").exists() and not Path("-").exists()
    # a file still gets the JSON, and the text stays on stdout
    into = tmp_path / "scores.json"
    result = ok(cli("evaluate", val_run, synth, "--json", into))
    assert json.loads(into.read_text()) == got
    assert "test: 150 rows" in result.stdout and f"written to {into}" in result.stdout


@pytest.mark.fast
def test_predict_reads_a_run_directory_as_evaluate_does(cli, val_run, synth, tmp_path):
    """predict RUN_DIR uses the run's best.h5 where it kept one, and says so."""
    text = ok(cli("predict", val_run, synth, tmp_path / "p.h5")).stdout
    assert f"of {val_run / 'best.h5'} to" in text
    with h5py.File(tmp_path / "p.h5", "r") as f:
        assert f.attrs["checkpoint"] == str(val_run / "best.h5")
