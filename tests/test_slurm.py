"""The SLURM scripts in jobs/, submitted with real sbatch to a one-node test cluster
(started by `make test`, tests/infra/slurm_cluster.sh)."""

from __future__ import annotations

import csv
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import HERE, child_env, load_weights, mpinn, ok, run, unavailable
from mpinn.perf import report
from mpinn.run import checkpoint

JOBS = HERE.parent / "jobs"
SCRIPTS = sorted(JOBS.glob("*.sbatch"))
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
        "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict[str, str]:
    conf = os.environ.get("MPINN_SLURM_CONF")
    if not conf or not Path(conf).exists():
        unavailable("a SLURM test cluster", "run the tests with `make test` as root (it starts "
                    "one with tests/infra/slurm_cluster.sh), or set MPINN_SLURM_CONF")
    env = child_env()
    env.update(SLURM_CONF=conf, MPINN_HOME=str(HERE.parent),
               MPINN_VENV=str(Path(sys.executable).parent.parent))
    return env


def sbatch(env: dict, cwd: Path, script: str, *options: str, **variables) -> str:
    job_env = dict(env, **{k: str(v) for k, v in variables.items()})
    result = ok(run(["sbatch", "--parsable", *options, str(JOBS / script)], cwd=cwd,
                    env=job_env, timeout=30))
    return result.stdout.strip().split(";")[0]


def job_field(env: dict, job: str, field: str) -> str:
    out = run(["scontrol", "show", "job", job], env=env, timeout=30).stdout
    match = re.search(rf"\b{field}=(\S+)", out)
    return match.group(1) if match else ""


def wait_done(env: dict, job: str, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_field(env, job, "JobState")
        if state in DONE:
            return state
        time.sleep(0.3)
    run(["scancel", job], env=env, timeout=30)
    pytest.fail(f"job {job} did not finish within {timeout} s (state {state})")


@pytest.mark.fast
def test_every_sbatch_line_is_commented_and_scripts_are_strict():
    assert {p.name for p in SCRIPTS} == {"train.sbatch", "scaling.sbatch"}
    for script in SCRIPTS:
        text = script.read_text()
        assert "set -euo pipefail" in text and "srun" not in text.split("env.sh")[0]
        for line in text.splitlines():
            if line.startswith("#SBATCH"):
                assert re.match(r"#SBATCH\s+\S+\s+#\s*\w", line), f"{script.name}: {line}"
        assert "--output=%x-%j.out" in text


@pytest.mark.parametrize("script", [p.name for p in SCRIPTS])
def test_scripts_refuse_to_run_outside_slurm(script, tmp_path):
    env = {k: v for k, v in child_env().items() if not k.startswith("SLURM_")}
    result = run(["bash", str(JOBS / script)], cwd=tmp_path, env=env, timeout=30)
    assert result.returncode == 2 and "not inside a SLURM job" in result.stderr


def test_train_sbatch(slurm, synth, tmp_path):
    job = sbatch(slurm, tmp_path, "train.sbatch", MPINN_DATA=synth,
                 MPINN_RUN_DIR=tmp_path / "run", MPINN_TRAIN_ARGS="--epochs 2 --hidden 8")
    assert wait_done(slurm, job) == "COMPLETED", (tmp_path / f"mpinn-train-{job}.out").read_text()
    assert job_field(slurm, job, "ExitCode") == "0:0"
    log = (tmp_path / f"mpinn-train-{job}.out").read_text()
    assert log.count("epoch 2/2") == 1 and "2 ranks" in log
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["epochs"] == 2
    assert checkpoint.load(str(tmp_path / "run" / "checkpoint.h5")).epoch == 2


def test_scaling_sbatch_writes_a_sweep_the_report_reads(slurm, synth, tmp_path):
    """jobs/scaling.sbatch: both modes on 1 and 2 ranks (up to --ntasks=2), launched with
    srun, into the layout of a local sweep; `mpinn scaling report` reads it alike."""
    job = sbatch(slurm, tmp_path, "scaling.sbatch", "--ntasks=2", MPINN_DATA=synth,
                 MPINN_SWEEP_DIR=tmp_path / "study", MPINN_BATCH=32,
                 MPINN_TRAIN_ARGS="--epochs 1 --hidden 8 --progress off")
    log_path = tmp_path / f"mpinn-scaling-{job}.out"
    assert wait_done(slurm, job) == "COMPLETED", log_path.read_text()
    manifest = json.loads((tmp_path / "study" / "sweep.json").read_text())
    assert manifest["mode"] == "both" and manifest["ranks"] == [1, 2]
    assert manifest["launcher"].startswith("srun --mpi=pmi2 --ntasks={n}")
    for mode in ("strong", "weak"):
        for n in (1, 2):
            summary = json.loads((tmp_path / "study" / mode / f"p{n}-r0" / "summary.json")
                                 .read_text())
            assert summary["ranks"] == n and summary["hosts"] and not summary["oversubscribed"]
            assert summary["batch_size"] == 32 * (n if mode == "weak" else 1)
    ok(mpinn(None, "scaling", "report", tmp_path / "study", "--out", tmp_path / "report"))
    with open(tmp_path / "report" / "points.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["mode"], r["ranks"]) for r in rows] == [
        ("strong", "1"), ("strong", "2"), ("weak", "1"), ("weak", "2")]
    assert list(rows[0]) == list(report.COLUMNS)
    assert all(r["predicted_step_s"] for r in rows)  # calibrated through srun too
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Strong scaling (global batch 32)" in text and "srun --mpi=pmi2" in text


def preempt(env: dict, cwd: Path, data: Path, args: str, *options: str) -> Path:
    """Submit jobs/train.sbatch, USR1 it once it trains, and wait until the requeued job
    completes; returns its run directory. Checks the restart and what the log tells."""
    run_dir = cwd / "run"
    job = sbatch(env, cwd, "train.sbatch", *options, MPINN_DATA=data, MPINN_RUN_DIR=run_dir,
                 MPINN_TRAIN_ARGS=args)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text()):
        assert time.monotonic() < deadline and job_field(env, job, "JobState") not in DONE
        time.sleep(0.1)
    ok(run(["scancel", "--signal=USR1", "--batch", job], env=env, timeout=30))
    log_path = cwd / f"mpinn-train-{job}.out"
    assert wait_done(env, job, timeout=300) == "COMPLETED", log_path.read_text()
    log = log_path.read_text()
    assert job_field(env, job, "Restarts") == "1", log
    assert "stopped by a signal" in log and "requeueing job" in log and "resumed from" in log
    return run_dir


def assert_same_weights(reference: Path, resumed: Path) -> None:
    """Bit for bit: the checkpoint of the interrupted run equals the uninterrupted one."""
    for a, b in zip(load_weights(reference / "checkpoint.h5"),
                    load_weights(resumed / "checkpoint.h5"), strict=True):
        np.testing.assert_array_equal(a, b)


PREEMPT_ARGS = "--epochs 8 --hidden 16 --dtype float64 --batch-size 5 --optimizer adam --seed 4"


def test_preempted_job_requeues_and_ends_bit_identical(slurm, synth, tmp_path):
    """scancel --signal=USR1 --batch: checkpoint, requeue, resume; weights as if never stopped."""
    run_dir = preempt(slurm, tmp_path, synth, PREEMPT_ARGS)
    reference = tmp_path / "reference"
    ok(mpinn(2, "train", synth, "--out", reference, *PREEMPT_ARGS.split()))
    assert_same_weights(reference, run_dir)
