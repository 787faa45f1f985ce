"""Benchmarks: `mpinn bench io DATA.h5` (run it under mpiexec).

For each available reader (independent; mpio if h5py has parallel HDF5) and
each shuffle mode, every rank reads its rows of the first `--steps` steps of an
epoch, exactly as training would (prefetch off, so the reads are timed alone).
The reference is a raw sequential read of the same number of bytes per rank
with plain POSIX reads of the dataset's file region. Throughput is over all
ranks (bytes / slowest rank's seconds), in two versions: `read`, the time
inside file reads, and `delivered`, the wall time until every batch is in its
buffer (block mode adds the in-memory shuffle of each window; prefetch hides
it during training). `vs raw` is the ratio to the reference.

Every pair is measured twice. `cold`: the file's pages are dropped from the
page cache first (posix_fadvise DONTNEED), so reads come from storage, as on a
cluster file system: this is where scattered row reads lose and large
contiguous reads win. `warm`: the file is in the page cache, so what is
measured is the software path (HDF5, MPI-IO, Python, memory copies).

Then a short training run (same reader, global shuffle, prefetch on) reports
the fraction of step time spent waiting for data.
"""

from __future__ import annotations

import os
import time

import h5py
import numpy as np

from mpinn.comm import collectives, world
from mpinn.comm.world import Comm
from mpinn.data.feed import Buffers, Feed
from mpinn.data.layout import Problem, check_data
from mpinn.data.readers import DataFile, parallel_hdf5
from mpinn.data.sampler import SHUFFLES, Sampling, ceil_div, epoch_plan, share
from mpinn.nn.model import Architecture
from mpinn.perf.bench import anonymous_memory, new_learner, report
from mpinn.train.step import train_step
from mpinn.train.timing import PhaseTimer

RAW_PIECE = 8 << 20  # bytes per POSIX read in the raw reference


def drop_cache(comm: Comm, path: str) -> None:
    """Collective: evict the file's pages from the page cache (clean pages need no root)."""
    collectives.barrier(comm)
    if comm.rank == 0:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    collectives.barrier(comm)


def raw_read(comm: Comm, path: str, nbytes: int) -> float:
    """Seconds for this rank to read nbytes sequentially from its part of /train/x."""
    with h5py.File(path, "r") as f:
        x = f["train"]["x"]
        offset, total = x.id.get_offset(), x.id.get_storage_size()
    if offset is None:
        return float("nan")  # chunked: no single file region to read raw
    start = offset + share(total, comm.rank, comm.size)[0]
    nbytes = min(nbytes, offset + total - start)
    buf = bytearray(min(RAW_PIECE, max(nbytes, 1)))
    fd = os.open(path, os.O_RDONLY)
    try:
        collectives.barrier(comm)
        began = time.perf_counter()
        done = 0
        while done < nbytes:
            done += os.preadv(fd, [memoryview(buf)[:min(len(buf), nbytes - done)]], start + done)
        return time.perf_counter() - began
    finally:
        os.close(fd)


def timed_reads(comm, path: str, io: str, shuffle: str, batch: int, steps: int,
                seed: int) -> tuple[float, float, int, int]:
    """(wall seconds, seconds in file reads, bytes, read calls) of this rank for the
    first `steps` steps of an epoch."""
    with DataFile(path, io, comm) as datafile:
        max_rows = ceil_div(batch, comm.size)
        reader = datafile.reader("train", max_rows)
        sampling = Sampling(shuffle)
        window_steps = sampling.window_steps(batch)
        plan = epoch_plan(sampling, seed, 0, reader.n, batch, comm.rank, comm.size)
        plan.steps, plan.batch_rows = plan.steps[:steps], plan.batch_rows[:steps]
        buffers = Buffers(reader, max_rows, window_steps * max_rows if shuffle == "block" else 0)
        collectives.barrier(comm)
        began = time.perf_counter()
        for _ in Feed(reader, plan, buffers, prefetch=False):
            pass
        return time.perf_counter() - began, reader.read_seconds, reader.bytes_read, reader.reads


def data_wait(comm, path: str, io: str, batch: int, steps: int, hidden: tuple[int, ...],
              seed: int) -> float:
    """Fraction of step time spent waiting for data in a short prefetching training run."""
    problem: Problem = check_data(comm, path, "cross-entropy")
    with DataFile(path, io, comm) as datafile:
        max_rows = ceil_div(batch, comm.size)
        reader = datafile.reader("train", max_rows)
        arch = Architecture((reader.features, *hidden, problem.outputs))
        learner = new_learner(comm, arch, max_rows, problem, "momentum", 0.01, seed)
        plan = epoch_plan(Sampling("global"), seed, 0, reader.n, batch, comm.rank, comm.size)
        plan.steps, plan.batch_rows = plan.steps[:steps], plan.batch_rows[:steps]
        prefetch = io != "mpio" or world.thread_multiple()
        timer = PhaseTimer()
        feed = Feed(reader, plan, Buffers(reader, max_rows), prefetch)
        batches = iter(feed)
        for _ in range(len(feed)):
            timer.begin_step()
            with timer.phase("data"):
                b = next(batches)
            train_step(learner, b, timer)
            timer.end_step(b.rows)
        feed.close()
    times = timer.reduce_all(comm)
    phases = times.phases
    memory = np.array([anonymous_memory()])
    collectives.allreduce_max(comm, memory)
    return phases["data"]["mean"] / sum(p["mean"] for p in phases.values())


def bench_io(comm: Comm, path: str, batch: int, steps: int, hidden: tuple[int, ...],
             seed: int, json_out: str | None) -> dict:
    check_data(comm, path, "cross-entropy")  # validates the file on every rank, collectively
    readers = ["independent"] + (["mpio"] if parallel_hdf5() else [])
    with h5py.File(path, "r") as f:
        n = f["train"]["x"].shape[0]
    steps = min(steps, ceil_div(n, batch))
    rows = []
    for io in readers:
        for shuffle in SHUFFLES:
            row = {"reader": io, "shuffle": shuffle}
            for cache in ("cold", "warm"):
                if cache == "cold":
                    drop_cache(comm, path)
                wall, reading, nbytes, calls = timed_reads(comm, path, io, shuffle, batch, steps,
                                                           seed)
                if cache == "cold":
                    drop_cache(comm, path)
                raw = raw_read(comm, path, nbytes)
                agg = np.array([nbytes, wall, reading, raw, calls], np.float64)
                total, peak = agg.copy(), agg.copy()
                collectives.allreduce_sum(comm, total)
                collectives.allreduce_max(comm, peak)
                row.update({"bytes": int(total[0]), "reads_per_rank": total[4] / comm.size,
                            f"{cache}_read_mb_per_s": total[0] / peak[2] / 1e6,
                            f"{cache}_raw_mb_per_s": total[0] / peak[3] / 1e6,
                            f"{cache}_read_vs_raw": peak[3] / peak[2],
                            f"{cache}_delivered_vs_raw": peak[3] / peak[1]})
            rows.append(row)
    waits = {io: data_wait(comm, path, io, batch, steps, hidden, seed) for io in readers}
    result = {"file": path, "ranks": comm.size, "batch_size": batch, "steps": steps,
              "mpi": world.library(), "modes": rows, "training_data_wait_fraction": waits}
    return report(comm, result, format_io(result), json_out)


def format_io(r: dict) -> str:
    lines = [f"mpinn bench io: {r['file']}, {r['ranks']} ranks, global batch {r['batch_size']}, "
             f"{r['steps']} steps ({r['mpi']}); MB/s over all ranks",
             f"{'':<21} {'------------- cold cache -------------':>40} "
             f"{'------------- warm cache -------------':>40}",
             f"{'reader':<12} {'shuffle':<8}" + f" {'read MB/s':>9} {'raw MB/s':>9} "
             f"{'read/raw':>9} {'deliv/raw':>9}" * 2 + f" {'reads/rank':>10}"]
    for m in r["modes"]:
        lines.append(f"{m['reader']:<12} {m['shuffle']:<8}"
                     + "".join(f" {m[f'{c}_read_mb_per_s']:9.1f} {m[f'{c}_raw_mb_per_s']:9.1f}"
                               f" {m[f'{c}_read_vs_raw']:9.2f} {m[f'{c}_delivered_vs_raw']:9.2f}"
                               for c in ("cold", "warm"))
                     + f" {m['reads_per_rank']:10.0f}")
    for io, wait in r["training_data_wait_fraction"].items():
        lines.append(f"training with {io} reader, global shuffle, prefetch: "
                     f"data wait {100 * wait:.2f}% of step time")
    return "\n".join(lines)

