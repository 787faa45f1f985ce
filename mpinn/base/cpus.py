"""What a process may run on: its CPUs and the BLAS threads a rank starts. No MPI
(the scaling driver, which must not start MPI, counts with these too)."""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

# in the order OpenBLAS (then MKL) reads them
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def one_thread_unless_set(environ: MutableMapping[str, str]) -> None:
    """One BLAS thread per rank unless the user set any of the variables (then all of
    them are the user's): P ranks on P cores that each start P threads fight for them.
    Only before NumPy loads its BLAS does this count (mpinn/__init__.py)."""
    if not any(v in environ for v in BLAS_THREAD_VARS):
        for var in BLAS_THREAD_VARS:
            environ[var] = "1"


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def blas_threads(environ: Mapping[str, str], cpus: int) -> int:
    """The BLAS threads of a rank: OpenBLAS reads OPENBLAS_NUM_THREADS, then
    OMP_NUM_THREADS (MKL: MKL_NUM_THREADS); unset, one per CPU (mpinn sets 1 unless
    the user set any of them: see mpinn/__init__.py)."""
    for var in BLAS_THREAD_VARS:
        value = environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return cpus
