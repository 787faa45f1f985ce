"""Where the ranks run, and launch checks before the first step: is this the job the
user launched?

Two classic mistakes make a data-parallel job silently wrong or slow:

- N copies of a 1-rank job: `srun -n 4 mpinn train ...` where the MPI library
  cannot talk to srun (no PMI support, or mpi4py built against another MPI),
  or mpiexec of one MPI starting a program linked to another. Every copy
  initialises MPI alone, is rank 0 of 1, and trains the whole dataset. The
  launcher's own task count for this step says otherwise: that is an error.
  (Not SLURM_NTASKS: it describes the allocation and leaks into a plain
  `mpiexec -n 1` inside it.)
- More ranks x BLAS threads than cores on one machine. A rank that waits in
  MPI busy-polls a core that another rank needs for its GEMMs: steps slow down
  several times over, with nothing wrong in the output. One warning, from rank
  0. Ranks are grouped by the kernel's boot id (one per machine, whatever the
  host names say) and cores counted from each rank's CPU affinity mask (what
  a cgroup, taskset or srun's binding leave it).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from mpinn.base.cpus import blas_threads
from mpinn.base.errors import UsageError
from mpinn.comm import collectives, console
from mpinn.comm.world import Comm, processor_name

# Per launcher, the variable holding the number of tasks of this job step.
TASK_COUNTS = {"SLURM_STEP_NUM_TASKS": "srun", "PMI_SIZE": "a PMI launcher (MPICH, Intel MPI)",
               "OMPI_COMM_WORLD_SIZE": "Open MPI's mpirun"}
OVERSUBSCRIBE_POLICIES = ("warn", "error")


def placement(comm: Comm) -> tuple[list[str], list[int]]:
    """Collective: the distinct hosts (MPI processor names, in order of their first
    rank) and how many ranks each runs."""
    hosts: dict[str, int] = {}
    names = collectives.gather_objects(comm, processor_name(), "an exchange of host names")
    for name in names:
        hosts[name] = hosts.get(name, 0) + 1
    return list(hosts), list(hosts.values())


def check(comm: Comm, environ: Mapping[str, str] = os.environ) -> None:
    """Collective: UsageError for a lone copy of a larger job; for oversubscribed
    cores a warning (rank 0), or with MPINN_OVERSUBSCRIBE=error (what `mpinn scaling
    run` sets unless asked to oversubscribe) a UsageError."""
    policy = environ.get("MPINN_OVERSUBSCRIBE", "warn")
    if policy not in OVERSUBSCRIBE_POLICIES:
        raise UsageError(f"MPINN_OVERSUBSCRIBE must be one of "
                         f"{', '.join(OVERSUBSCRIBE_POLICIES)}, not {policy!r}")
    if comm.size == 1:
        lone_copy(environ)
    warning = oversubscription(collectives.gather_objects(comm, machine_share(environ)))
    if warning and policy == "error":
        raise UsageError(f"oversubscribed, and MPINN_OVERSUBSCRIBE=error: {warning} (`mpinn "
                         f"scaling run` sets MPINN_OVERSUBSCRIBE=error unless given "
                         f"--oversubscribe)")
    if warning:
        console.print0(comm, f"mpinn: warning: {warning}", file=sys.stderr)


def oversubscribed(comm: Comm, environ: Mapping[str, str] = os.environ) -> bool:
    """Collective: whether some machine runs more ranks x BLAS threads than it has CPUs."""
    return oversubscription(collectives.gather_objects(comm, machine_share(environ))) is not None


def lone_copy(environ: Mapping[str, str]) -> None:
    """UsageError if the launcher started more tasks than MPI sees (this one is alone)."""
    for var, launcher in TASK_COUNTS.items():
        tasks = environ.get(var, "")
        if tasks.isdigit() and int(tasks) > 1:
            raise UsageError(
                f"{launcher} started {tasks} tasks ({var}={tasks}), but MPI sees this process "
                f"alone (1 rank): each task would train on its own. Under SLURM, launch with "
                f"`srun --mpi=pmi2` (see `srun --mpi=list`); otherwise mpi4py was built against "
                f"another MPI than this launcher's: use that MPI's mpiexec, or rebuild mpi4py "
                f"with `make install MPI=system` after loading the site's MPI")


def machine_share(environ: Mapping[str, str]) -> tuple[str, list[int], int]:
    """(boot id, CPUs this rank may run on, BLAS threads it starts)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            machine = f.read().strip()
    except OSError:  # not Linux: the host name is the best there is
        machine = os.uname().nodename
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    return machine, cpus, blas_threads(environ, len(cpus))


def oversubscription(shares: list[tuple[str, list[int], int]]) -> str | None:
    """The warning for the machines whose ranks want more threads than they have CPUs."""
    machines: dict[str, tuple[list[int], set[int], int]] = {}
    for rank, (machine, cpus, threads) in enumerate(shares):
        ranks, union, total = machines.get(machine, ([], set(), 0))
        machines[machine] = ([*ranks, rank], union | set(cpus), total + threads)
    crowded = [(ranks, len(union), total) for ranks, union, total in machines.values()
               if total > len(union)]
    if not crowded:
        return None
    ranks, cores, threads = max(crowded, key=lambda c: c[2] / c[1])
    per_rank = threads // len(ranks)
    return (f"{len(ranks)} ranks x {per_rank} BLAS thread{'s' if per_rank > 1 else ''} share "
            f"{cores} core{'s' if cores > 1 else ''} on one machine (ranks {compact(ranks)}"
            + (f"; {len(crowded)} machines are like this" if len(crowded) > 1 else "")
            + f"): they take turns on the cores, and a rank that waits in MPI keeps a core "
            f"busy polling, so every step waits for descheduled ranks; expect steps several "
            f"times slower than with {max(1, cores // max(per_rank, 1))} rank"
            f"{'s' if cores // max(per_rank, 1) > 1 else ''} per machine. Fine for testing; "
            f"for speed, run at most cores / threads ranks per machine")


def compact(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    runs: list[list[int]] = []
    for r in ranks:
        if runs and r == runs[-1][-1] + 1:
            runs[-1].append(r)
        else:
            runs.append([r])
    return ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 2 else ", ".join(map(str, run))
                     for run in runs)


def relaunch(size: int, environ: Mapping[str, str] = os.environ) -> str | None:
    """How this job was launched, as the command prefix that starts it again with `size`
    ranks: 'mpiexec -n 4' (Hydra: MPICH, Intel MPI), 'mpirun -n 4' (Open MPI), 'srun -n 4';
    '' for one process that no launcher started; None where it cannot be told."""
    if "HYDI_CONTROL_FD" in environ:  # Hydra's proxy talks to each rank on this descriptor
        return f"mpiexec -n {size}"
    if "PRTE_LAUNCHED" in environ or "OMPI_MCA_orte_hnp_uri" in environ:  # Open MPI 5, 4
        return f"mpirun -n {size}"  # (inside an allocation too, where srun starts its daemons)
    if environ.get("SLURM_STEP_NUM_TASKS") == str(size):
        return f"srun -n {size}"
    if size == 1 and not any(name in environ for name in TASK_COUNTS):
        return ""
    return None
