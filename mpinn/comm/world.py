"""The world: MPI started, the library that runs it, the host and threads of a rank."""

from __future__ import annotations

from mpi4py import MPI

Comm = MPI.Comm


def start() -> Comm:
    """Start MPI (once: a no-op if it runs already) with MPI_THREAD_MULTIPLE asked for,
    as mpi4py would on import, and return the world communicator. Only the entry point
    of a parallel command (and a test or script that is one) calls this."""
    if not MPI.Is_initialized():
        MPI.Init_thread(MPI.THREAD_MULTIPLE)
    return MPI.COMM_WORLD


def library() -> str:
    """First line of the MPI library's version string, e.g. 'MPICH Version: 5.0.2'."""
    return " ".join(MPI.Get_library_version().splitlines()[0].split())


def library_version() -> str:
    """The MPI library's whole version text (MPICH names its device and configuration)."""
    return MPI.Get_library_version().strip()


def processor_name() -> str:
    """This rank's host as MPI names it (what placement() counts)."""
    return MPI.Get_processor_name()


def thread_multiple() -> bool:
    """Whether MPI lets any thread make MPI calls at any time (MPI_THREAD_MULTIPLE)."""
    return MPI.Query_thread() == MPI.THREAD_MULTIPLE

