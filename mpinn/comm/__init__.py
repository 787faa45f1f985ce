"""comm: every MPI call mpinn makes, and nothing else (the layers above hold no mpi4py).

Importing this package does not start MPI. The entry point starts it
(`world.start()`), and mpi4py ends it at the process's exit (MPI_Finalize): without
the finalize, every clean exit of a process that started MPI itself leaves MPICH's
shared-memory segment behind in /dev/shm. Functions take the communicator
explicitly, so that tests can pass COMM_SELF, a Dup() of the world or a wrapper.
"""

import mpi4py

mpi4py.rc.initialize = False  # world.start() initialises; an import never does
mpi4py.rc.finalize = True  # MPI_Finalize at exit, also after our own MPI_Init_thread
