"""mpinn: data-parallel training of multilayer perceptrons over MPI.

One BLAS thread per rank unless the user says otherwise: set before NumPy loads
its BLAS, because P ranks on P cores each starting P BLAS threads fight for the
cores. Setting any of OMP_NUM_THREADS, OPENBLAS_NUM_THREADS, MKL_NUM_THREADS
yourself (e.g. OMP_NUM_THREADS=4, or SLURM's cpus-per-task in jobs/) leaves all of
them to you.
"""

import os

from mpinn.base.cpus import one_thread_unless_set

__version__ = "0.1.0"

one_thread_unless_set(os.environ)
