"""Timed MPI calls for the benchmarks: the bare Allreduce, ping-pong and exchange."""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

from mpinn.comm.world import Comm


def bare_allreduce(comm: Comm, buf: np.ndarray) -> None:
    """The plain blocking MPI_Allreduce (SUM, in place): the benchmarks' reference."""
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)


def timed_allreduce(comm: Comm, buf: np.ndarray, repeats: int, blocking: bool) -> float:
    """Seconds per in-place SUM Allreduce of buf on this rank, over `repeats` calls after a
    barrier: the blocking MPI_Allreduce, or MPI_Iallreduce + Wait (what the gradient
    sync runs; MPICH picks its algorithms separately for the two)."""
    comm.Barrier()
    began = time.perf_counter()
    for _ in range(repeats):
        if blocking:
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        else:
            comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM).Wait()
    return (time.perf_counter() - began) / repeats


def ping_pong(comm: Comm, peer: int, buf: np.ndarray, repeats: int, lead: bool) -> float:
    """Seconds per round trip of buf between this rank and peer (the lead sends first,
    the other sends back what it received). Only the two ranks take part."""
    began = time.perf_counter()
    for _ in range(repeats):
        if lead:
            comm.Send(buf, peer, 7)
            comm.Recv(buf, peer, 7)
        else:
            comm.Recv(buf, peer, 7)
            comm.Send(buf, peer, 7)
    return (time.perf_counter() - began) / repeats


def exchange(comm: Comm, peer: int, buf: np.ndarray, into: np.ndarray, repeats: int) -> float:
    """Seconds per MPI_Sendrecv of buf to peer while receiving peer's into `into`: both
    directions at once, the step of recursive doubling and halving."""
    began = time.perf_counter()
    for _ in range(repeats):
        comm.Sendrecv(buf, peer, 8, into, peer, 8)
    return (time.perf_counter() - began) / repeats
