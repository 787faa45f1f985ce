"""Metrics (confusion, precision, recall, F1), `mpinn evaluate --json`, progress within an
epoch and `mpinn plot`."""

from __future__ import annotations

import json
import os
import pty
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import RANKS, child_env, mpi_script, mpinn, ok, unavailable

SCORES = ("loss", "accuracy", "precision", "recall", "f1")


@pytest.mark.parametrize("n", RANKS)
def test_metrics_agree_with_the_gathered_predictions(synth, n):
    # a class never predicted, a class without rows, shares of every size
    ok(mpi_script(n, "metrics_agree.py", synth))


def train_run(synth: Path, out: Path, n: int, *extra) -> list[dict]:
    ok(mpinn(n, "train", synth, "--out", out, "--epochs", 2, "--hidden", "16", "--batch-size",
             32, "--dtype", "float64", "--progress", "off", *extra))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_epoch_records_hold_train_and_test_scores_independent_of_ranks(synth, tmp_path):
    one = train_run(synth, tmp_path / "one", 1)
    three = train_run(synth, tmp_path / "three", 3)
    assert [r["epoch"] for r in three] == [1, 2]
    for a, b in zip(one, three):
        for split in ("train", "test"):
            for score in SCORES:
                key = f"{split}_{score}"
                assert b[key] is not None and (score == "loss" or 0 <= b[key] <= 1), key
                # the same trajectory at 1 and 3 ranks: the counts of all ranks were reduced
                assert b[key] == pytest.approx(a[key], rel=1e-9), key


def parse_printed(stdout: str) -> tuple[dict, list[list[int]]]:
    numbers = dict(re.findall(r"(loss|accuracy|precision|recall|f1) ([0-9.]+)", stdout))
    lines = stdout.split("columns: predicted)\n")[1].splitlines()
    header = lines[0].split()
    matrix = [[int(v) for v in line.split()[1:]] for line in lines[1:len(header)]]
    return {k: float(v) for k, v in numbers.items()}, matrix


def test_evaluate_prints_and_writes_the_scores(synth, tmp_path):
    records = train_run(synth, tmp_path / "run", 2)
    scores = tmp_path / "scores.json"
    result = ok(mpinn(3, "evaluate", tmp_path / "run", synth, "--json", scores))
    got = json.loads(scores.read_text())
    assert set(got) >= {"rows", "loss", "accuracy", "precision", "recall", "f1", "confusion"}
    for name in ("precision", "recall", "f1"):
        assert set(got[name]) == {"per_class", "macro"} and len(got[name]["per_class"]) == 4
        assert got[name]["macro"] == pytest.approx(np.mean(got[name]["per_class"]))
    confusion = np.array(got["confusion"])
    assert confusion.shape == (4, 4) and confusion.sum() == got["rows"] == 150
    assert got["accuracy"] == pytest.approx(np.trace(confusion) / 150)
    printed, matrix = parse_printed(result.stdout)
    assert matrix == got["confusion"]
    assert printed["loss"] == pytest.approx(got["loss"], abs=1e-6)
    for name in ("accuracy", "precision", "recall", "f1"):
        value = got[name] if name == "accuracy" else got[name]["macro"]
        assert printed[name] == pytest.approx(value, abs=1e-4), name
        # the final epoch's test scores are this checkpoint's on the test split
        assert records[-1][f"test_{name}"] == pytest.approx(value, rel=1e-9), name
    assert result.stdout.count("confusion matrix") == 1  # printed once, by rank 0


def progress_run(synth: Path, out: Path, *extra) -> str:
    return ok(mpinn(2, "train", synth, "--out", out, "--epochs", 2, "--hidden", "16",
                    "--batch-size", 4, *extra)).stdout


def test_progress_lines_come_during_the_epoch(synth, tmp_path):
    stdout = progress_run(synth, tmp_path / "a", "--log-every", "0.001")  # epochs: ~30 ms
    assert "\r" not in stdout  # piped: auto means lines
    first_epoch = stdout.split("epoch 1/2  train")[0]
    steps = [int(s) for s in re.findall(r"^epoch 1/2 step (\d+)/150 loss [0-9.]+ .* "
                                        r"samples/s  ETA \S+$", first_epoch, re.M)]
    assert len(steps) >= 2, stdout
    assert steps == sorted(set(steps)) and steps[0] < 150  # during the epoch, not after
    assert re.search(r"^epoch 2/2 step \d+/150", stdout, re.M)
    quiet = progress_run(synth, tmp_path / "b", "--log-every", "0.02", "--progress", "off")
    assert " step " not in quiet and "epoch 2/2  train" in quiet


def test_a_live_bar_at_a_terminal(synth, tmp_path):
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "mpinn", "train", str(synth), "--out",
                             str(tmp_path / "run"), "--epochs", "2", "--hidden", "16",
                             "--batch-size", "4", "--log-every", "0.001"],
                            stdout=slave, stderr=subprocess.PIPE, env=child_env())
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    os.close(master)
    out = b"".join(chunks).decode()
    redraws = re.findall(r"\repoch 1/2 \[[#.]+\] (\d+)/150", out)
    assert len(redraws) >= 2 and [int(s) for s in redraws][-1] == 150, out
    # the bar ends with a newline before the epoch's line
    assert re.search(r"150/150 [^\r\n]*\r?\nepoch 1/2  train", out), out


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png(synth, tmp_path):
    try:
        import matplotlib.image
    except ImportError:
        unavailable("matplotlib", "pip install 'mpinn[plot]'")
    run = tmp_path / "run"
    train_run(synth, run, 1)
    ok(mpinn(None, "plot", run))
    width, height = png_size(run / "metrics.png")
    assert width > 2 * height > 0
    assert matplotlib.image.imread(run / "metrics.png").shape[:2] == (height, width)
    # validation curves when the run has them; --out elsewhere
    records = [dict(r, val_loss=r["train_loss"], val_accuracy=0.5, val_f1=0.5)
               for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    ok(mpinn(None, "plot", run, "--out", tmp_path / "curves.png"))
    assert png_size(tmp_path / "curves.png") == (width, height)


def test_plot_without_matplotlib_says_how_to_get_it(synth, tmp_path):
    fake = tmp_path / "fake" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    run = tmp_path / "run"
    train_run(synth, run, 1)
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(fake.parent), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-m", "mpinn", "plot", run], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "pip install 'mpinn[plot]'" in result.stderr
    assert result.stderr.count("\n") == 1 and not (run / "metrics.png").exists()


@pytest.mark.fast
def test_the_epoch_line_reads_train_val_test():
    """The order of a run's life: fit (train), select (val), report (test)."""
    from mpinn.train.summary import format_epoch
    record = {"epoch": 3, "lr": 0.01, "samples_per_s": 1000.0, "seconds": 1.5}
    for split, loss in (("train", 0.5), ("val", 0.6), ("test", 0.7)):
        record.update({f"{split}_loss": loss, f"{split}_accuracy": 0.8, f"{split}_f1": 0.75})
    line = format_epoch(record, 10, classification=True)
    assert line.startswith("epoch 3/10  train loss 0.5000 acc 0.8000 f1 0.7500  val loss "
                           "0.6000 acc 0.8000 f1 0.7500  test loss 0.7000 ")
    record.update(val_loss=None, val_accuracy=None, val_f1=None)  # no --val-fraction
    assert "  train loss 0.5000 acc 0.8000 f1 0.7500  test loss 0.7000" in format_epoch(
        record, 10, classification=True)
