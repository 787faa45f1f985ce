"""A rank that stops answering is reported and ends the job; a job launched wrong is told.

Real faults: one rank of a real mpiexec job is frozen with SIGSTOP (what a
swapping node or a stuck file system looks like to the other ranks), then
every collective of the training loop must notice within --stall-timeout,
name the frozen rank, and end the whole job (exit 1).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import h5py
import pytest

from conftest import (
    child_env,
    expect_error,
    finish,
    mpi_script,
    mpiexec,
    mpinn,
    ok,
    rank_pids,
    run,
    start_mpinn,
    text_of,
    wait_for,
)
from mpinn.comm import preflight


def rank_of(pid: int) -> int:
    """The MPI rank of a process that mpiexec started (Hydra exports PMI_RANK)."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"PMI_RANK=")).split(b"=")[1])


def start_long_run(synth: Path, out: Path, *flags) -> tuple:
    """3 ranks training (almost) forever, once they have written a checkpoint:
    (process, {rank: pid})."""
    proc = start_mpinn(3, "train", synth, "--out", out, "--hidden", "8", "--epochs", 100000,
                       "--batch-size", 8, "--checkpoint-every", 20, *flags)
    wait_for(lambda: (out / "checkpoint.h5").exists(), proc)
    pids = {rank_of(pid): pid for pid in rank_pids(str(out))}
    assert sorted(pids) == [0, 1, 2], pids
    return proc, pids


def freeze_rank_2(proc, pids: dict, ends_within: float, then=lambda: None):
    """SIGSTOP rank 2, then `then()`; the job's result, which must come within
    ends_within seconds of that."""
    try:
        os.kill(pids[2], signal.SIGSTOP)
        then()
        began = time.monotonic()
        result = finish(proc, timeout=60)
        assert time.monotonic() - began < ends_within
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return result


def test_a_stalled_rank_is_named_and_the_job_ends(synth, tmp_path):
    out = tmp_path / "stall"
    # 100 B buckets: the 8-wide model's gradient goes out in two, while backward runs
    proc, pids = start_long_run(synth, out, "--stall-timeout", 5, "--bucket-mb", "0.0001")
    result = freeze_rank_2(proc, pids, ends_within=35)
    expect_error(result, 1, "stalled:", "rank 2 (", f"pid {pids[2]}) did not answer",
                 "--stall-timeout 5 s passed", "in the gradient Allreduce (bucket 1 of 2,")
    assert "Rank 1: waiting in the same call" in result.stderr, result.stderr
    time.sleep(0.5)
    assert rank_pids(str(out)) == []  # the frozen rank is gone too
    # the newest checkpoint is intact: it evaluates, and the run continues from it
    ok(mpinn(2, "evaluate", out, synth))
    with h5py.File(out / "checkpoint.h5", "r") as f:
        epochs = int(f.attrs["epoch"]) + 1
    ok(mpinn(2, "train", "--out", out, "--resume", "--epochs", epochs))


def test_a_stop_signal_during_a_stall_ends_the_job(synth, tmp_path):
    """No --stall-timeout (default 600 s): SIGTERM to a rank that waits for the frozen
    one cannot give a checkpoint (that needs every rank), so it ends the job, exit 1."""
    out = tmp_path / "stop"
    proc, pids = start_long_run(synth, out)

    def terminate_rank_0() -> None:
        time.sleep(1)  # ranks 0 and 1 now wait in the step's Allreduce
        os.kill(pids[0], signal.SIGTERM)
    result = freeze_rank_2(proc, pids, ends_within=30, then=terminate_rank_0)
    expect_error(result, 1, "stalled:", "rank 2 (", "a stop signal arrived")
    ok(mpinn(1, "evaluate", out, synth))


def test_a_short_timeout_does_not_fire_on_a_healthy_run(synth, tmp_path):
    """Ranks that wait for a checkpoint write or a slower rank are not stalled."""
    result = ok(mpinn(3, "train", synth, "--out", tmp_path / "r", "--hidden", "8",
                      "--epochs", 2, "--batch-size", 16, "--checkpoint-every", 5,
                      "--stall-timeout", 2))
    assert "stalled" not in result.stderr


# -- launch preflight -----------------------------------------------------------------


@pytest.mark.parametrize("var", ["SLURM_STEP_NUM_TASKS", "PMI_SIZE"])
def test_a_lone_copy_of_a_larger_job_is_refused(var, synth, tmp_path):
    """`srun -n 4` of an MPI that cannot talk to srun: 4 singletons. Each refuses, also
    a copy whose launcher rank is not 0 (its message must not be swallowed)."""
    env = {**child_env(), var: "4", "SLURM_PROCID": "2"}
    result = run([sys.executable, "-m", "mpinn", "train", synth, "--out", tmp_path / "r"],
                 timeout=60, env=env)
    expect_error(result, 2, f"{var}=4", "alone (1 rank)", "srun --mpi=pmi2")
    assert not (tmp_path / "r").exists()


def test_more_ranks_than_cores_warn_once(synth, tmp_path):
    """4 ranks on a 2-CPU affinity mask warn (once); 2 ranks on 2 CPUs do not."""
    ok(mpinn(1, "train", synth, "--out", tmp_path / "r", "--epochs", 0, "--hidden", "8"))
    crowded = run(["taskset", "-c", "0,1", mpiexec(), "-n", 4, sys.executable, "-m", "mpinn",
                   "evaluate", tmp_path / "r", synth], timeout=120)
    assert crowded.returncode == 0, text_of(crowded)
    assert crowded.stderr.count("mpinn: warning:") == 1, crowded.stderr
    assert "4 ranks x 1 BLAS thread share 2 cores" in crowded.stderr
    fitting = run(["taskset", "-c", "0,1", mpiexec(), "-n", 2, sys.executable, "-m", "mpinn",
                   "evaluate", tmp_path / "r", synth], timeout=120)
    assert fitting.returncode == 0 and "warning" not in fitting.stderr, text_of(fitting)


@pytest.mark.fast
@pytest.mark.parametrize("environ,expected", [
    ({"HYDI_CONTROL_FD": "7", "PMI_SIZE": "3"}, "mpiexec -n 3"),  # MPICH's or Intel MPI's
    ({"HYDI_CONTROL_FD": "7", "SLURM_STEP_NUM_TASKS": "1"}, "mpiexec -n 3"),  # in a job
    ({"OMPI_COMM_WORLD_SIZE": "3", "PRTE_LAUNCHED": "1"}, "mpirun -n 3"),  # Open MPI 5
    ({"OMPI_COMM_WORLD_SIZE": "3", "OMPI_MCA_orte_hnp_uri": "x"}, "mpirun -n 3"),  # 4
    # mpirun in a SLURM job starts its daemons with srun, one per node
    ({"OMPI_COMM_WORLD_SIZE": "3", "PRTE_LAUNCHED": "1", "SLURM_STEP_NUM_TASKS": "3"},
     "mpirun -n 3"),
    ({"SLURM_STEP_NUM_TASKS": "3", "PMI_SIZE": "3"}, "srun -n 3"),
    ({"SLURM_STEP_NUM_TASKS": "3", "OMPI_COMM_WORLD_SIZE": "3"}, "srun -n 3"),  # direct
    ({"OMPI_COMM_WORLD_SIZE": "3"}, None),
    ({"PMI_SIZE": "3"}, None),  # a PMI launcher mpinn cannot name
    ({}, None),
])
def test_the_stop_hint_names_the_launcher(environ, expected):
    assert preflight.relaunch(3, environ) == expected
    assert preflight.relaunch(1, {}) == ""  # one process, no launcher: plain `mpinn train`


@pytest.mark.fast
def test_the_resume_hint_says_what_it_cannot_tell(monkeypatch):
    from mpinn.train.summary import resume_hint
    monkeypatch.setenv("PMI_SIZE", "4")
    monkeypatch.delenv("HYDI_CONTROL_FD", raising=False)
    for name in ("OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    assert resume_hint("runs/a", 4, " --epochs 9") == ("continue with the same launcher and "
                                                       "rank count: mpinn train --out runs/a "
                                                       "--resume --epochs 9")


@pytest.mark.fast
def test_oversubscription_is_counted_per_machine():
    """Ranks group by boot id; cores are the union of their affinity masks."""
    a, b = "boot-a", "boot-b"
    fits = [(a, [0, 1], 1), (a, [2, 3], 1), (b, [0, 1, 2, 3], 2), (b, [0, 1, 2, 3], 2)]
    assert preflight.oversubscription(fits) is None
    crowded = [(a, [0, 1], 1)] * 2 + [(b, [0, 1], 2), (b, [0, 1], 2)]
    warning = preflight.oversubscription(crowded)
    assert "2 ranks x 2 BLAS threads share 2 cores" in warning and "ranks 2, 3" in warning
    assert preflight.blas_threads({}, 8) == 8  # unset: OpenBLAS starts one per CPU
    assert preflight.blas_threads({"OMP_NUM_THREADS": "4", "OPENBLAS_NUM_THREADS": "2"}, 8) == 2
    assert preflight.compact([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7, 8"


def test_a_rank_late_beyond_the_timeout_but_within_the_census_is_not_stalled(synth, tmp_path):
    """Rank 0 takes 2.5 s for a checkpoint while the others wait, --stall-timeout 2: the
    census starts, rank 0's write ends during it, and the run goes on to the end."""
    result = ok(mpi_script(2, "slow_checkpoint.py", 2.5, "--", "train", synth, "--out",
                           tmp_path / "r", "--hidden", "8", "--epochs", 2, "--batch-size", 64,
                           "--stall-timeout", 2, timeout=120))
    assert "stalled" not in result.stderr and "epoch 2/2" in result.stdout
