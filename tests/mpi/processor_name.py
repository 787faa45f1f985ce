"""Print each rank's processor name (the host it runs on), one line per rank, from rank 0
(lines printed by several ranks may interleave in mpiexec's output)."""

from mpi4py import MPI

comm = MPI.COMM_WORLD
names = comm.gather(MPI.Get_processor_name(), root=0)
if comm.rank == 0:
    for rank, name in enumerate(names):
        print(rank, name, flush=True)
