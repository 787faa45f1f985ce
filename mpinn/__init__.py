"""mpinn: data-parallel training of multilayer perceptrons over MPI.

One BLAS thread per rank unless the user says otherwise: set before NumPy loads
its BLAS, because P ranks on P cores each starting P BLAS threads fight for the
cores. Setting any of the variables below yourself (e.g. OMP_NUM_THREADS=4, or
SLURM's cpus-per-task in jobs/) leaves all of them to you.
"""

import os

__version__ = "0.1.0"

_BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
if not any(v in os.environ for v in _BLAS_THREAD_VARS):
    for _var in _BLAS_THREAD_VARS:
        os.environ[_var] = "1"
