"""`mpinn bench comm` (under mpiexec or srun): the links between ranks, measured and fitted.

    mpiexec -n 2 mpinn bench comm --json comm.json

For each transport present, one pair of ranks: `shm` (two ranks on one host, by MPI
processor name) and `net` (ranks 0 and the first rank on another host). Over message
sizes from 8 B to --max-bytes the pair runs a ping-pong (one-way time = round trip / 2)
and an exchange (MPI_Sendrecv: both directions at once, the step of every Allreduce
algorithm); the fit t = alpha + n beta (costmodel.fit, relative least squares) of each
gives latency alpha and inverse bandwidth beta, with each size's relative residual.
gamma (s per byte added) is numpy's float32 add on every rank at once (the slowest).

Then the Allreduce of all ranks, float32 SUM in place, both as MPI_Iallreduce + Wait
(what the gradient sync runs) and as the blocking MPI_Allreduce, against the closed
forms of costmodel (ring, Rabenseifner, recursive doubling, and the one MPICH picks)
evaluated with the fitted exchange alpha, beta and gamma.

Each measurement repeats until about --budget seconds have passed (at least 3, at
most --repeats times; the ranks agree on the count), after one warm-up call. On a
machine with few cores, pin the ranks (`mpiexec -bind-to core`): unpinned ranks that
meet on one core make the times vary by 2x from run to run.
"""

from __future__ import annotations

import time

import numpy as np

from mpinn.base.errors import UsageError
from mpinn.comm import collectives, measure, preflight, world
from mpinn.comm.world import Comm
from mpinn.perf import costmodel
from mpinn.perf.bench import report

MIN_REPEATS = 3
MAX_BYTES = 1 << 30
WARM_CALLS = 6  # MPICH's shared-memory Allreduce starts after 5 calls on a communicator


def default_sizes(max_bytes: int) -> list[int]:
    """8 B, 32 B, 128 B .. (x4) up to max_bytes, which is always the last size."""
    sizes, n = [], 8
    while n < max_bytes:
        sizes.append(n)
        n *= 4
    return sizes + [max_bytes]


def message_sizes(text: str | None, max_bytes: int, repeats: int, budget: float) -> list[int]:
    """The sizes of --sizes (comma separated) or else up to --max-bytes; UsageError if a
    flag is bad (every rank parses the same argv, so all raise alike)."""
    if repeats < 1 or not budget > 0:
        raise UsageError("--repeats must be >= 1 and --budget > 0 seconds")
    if text is None:
        if not 8 <= max_bytes <= MAX_BYTES:
            raise UsageError(f"--max-bytes must be 8 to {MAX_BYTES} (1 GiB), not {max_bytes}")
        return default_sizes(max_bytes)
    try:
        sizes = sorted({int(s) for s in text.split(",")})
    except ValueError:
        raise UsageError(f"--sizes: comma-separated byte counts, not {text!r}") from None
    if len(sizes) < 2 or sizes[0] < 1 or sizes[-1] > MAX_BYTES:
        raise UsageError(f"--sizes: at least two sizes from 1 byte to 1 GiB, not {text!r}")
    return sizes


def check_ranks(comm: Comm) -> None:
    if comm.size < 2:
        raise UsageError("bench comm measures the links between ranks: run it under "
                         "mpiexec -n 2 (or more), or srun with 2 tasks or more")


def agreed_repeats(comm: Comm, seconds: float, budget: float, most: int) -> int:
    """Collective: how many repeats fill the budget, from the slowest rank's warm-up."""
    slowest = np.array([seconds])
    collectives.allreduce_max(comm, slowest, "an agreement on repeats")
    return int(min(most, max(MIN_REPEATS, budget / max(slowest[0], 1e-9))))


def pairs(names: list[str]) -> dict[str, tuple[int, int]]:
    """One pair of ranks per transport: shm (the first two ranks on one host), net (the
    first two ranks on different hosts: rank 0 and the first rank elsewhere)."""
    found: dict[str, tuple[int, int]] = {}
    for b, name in enumerate(names):
        for a in range(b):
            found.setdefault("shm" if names[a] == name else "net", (a, b))
    return found


def pair_time(comm: Comm, kind: str, pair: tuple[int, int], buf: np.ndarray,
              into: np.ndarray, repeats: int) -> float:
    """Seconds of one ping-pong's one way (round trip / 2) or of one exchange; 0 on a
    rank outside the pair."""
    if comm.rank not in pair:
        return 0.0
    lead = comm.rank == pair[0]
    peer = pair[1] if lead else pair[0]
    if kind == "pingpong":
        return measure.ping_pong(comm, peer, buf, repeats, lead) / 2
    return measure.exchange(comm, peer, buf, into, repeats)


def measure_pair(comm: Comm, pair: tuple[int, int], sizes: list[int], budget: float,
                 most: int) -> dict[str, list[dict]]:
    """Collective (only the pair sends): {"pingpong": points, "exchange": points}, a
    point being {"bytes", "time_s", "repeats"} (the pair's slower rank)."""
    found: dict[str, list[dict]] = {"pingpong": [], "exchange": []}
    for n in sizes:
        buf, into = np.zeros(n, np.uint8), np.zeros(n, np.uint8)
        for kind, points in found.items():
            warm = pair_time(comm, kind, pair, buf, into, 1)
            repeats = agreed_repeats(comm, warm, budget, most)
            took = np.array([pair_time(comm, kind, pair, buf, into, repeats)])
            collectives.allreduce_max(comm, took, "the pair's time")
            points.append({"bytes": n, "time_s": float(took[0]), "repeats": repeats})
    return found


def measure_allreduce(comm: Comm, sizes: list[int], budget: float, most: int
                      ) -> list[dict]:
    """Collective: seconds per float32 Allreduce of each size, nonblocking (time_s) and
    blocking (blocking_s), the slowest rank's."""
    measure.timed_allreduce(comm, np.zeros(1, np.float32), WARM_CALLS, True)
    points = []
    for n in sizes:
        buf = np.zeros(max(1, n // 4), np.float32)
        point: dict = {"bytes": buf.nbytes}
        for key, blocking in (("time_s", False), ("blocking_s", True)):
            warm = measure.timed_allreduce(comm, buf, 1, blocking)
            repeats = agreed_repeats(comm, warm, budget, most)
            took = np.array([measure.timed_allreduce(comm, buf, repeats, blocking)])
            collectives.allreduce_max(comm, took, "the Allreduce's time")
            point[key], point["repeats"] = float(took[0]), repeats
        points.append(point)
    return points


def measure_gamma(comm: Comm, budget: float) -> float:
    """Collective: s per byte of a float32 a += b on every rank at once (the slowest):
    the slope of a fit over 32 KB .. 8 MB (the intercept is the call's overhead)."""
    sizes, times = [], []
    for n in (1 << 15, 1 << 18, 1 << 21, 1 << 23):
        a, b = np.ones(n // 4, np.float32), np.ones(n // 4, np.float32)
        collectives.barrier(comm)
        repeats, began = 0, time.perf_counter()
        while repeats < MIN_REPEATS or time.perf_counter() - began < budget / 4:
            np.add(a, b, out=a)
            repeats += 1
        sizes.append(n)
        times.append((time.perf_counter() - began) / repeats)
    gamma = np.array([costmodel.fit(sizes, times)[1]])
    collectives.allreduce_max(comm, gamma, "the reduction's speed")
    return float(gamma[0])


def fitted(points: list[dict]) -> dict:
    """alpha, beta and the relative residual (fit / measured - 1) of each point."""
    alpha, beta, residuals = costmodel.fit([p["bytes"] for p in points],
                                           [p["time_s"] for p in points])
    for p, r in zip(points, residuals):
        p["residual"] = float(r)
    return {"alpha_s": alpha, "beta_s_per_byte": beta,
            "bandwidth_mb_per_s": 1e-6 / beta if beta > 0 else None,
            "max_abs_residual": float(np.max(np.abs(residuals))), "points": points}


def transport(pair: tuple[int, int], measured: dict[str, list[dict]]) -> dict:
    """A transport's entry: the ping-pong's fit at the top, the exchange's under
    "exchange" (the collectives' model uses the exchange: both directions at once)."""
    return fitted(measured["pingpong"]) | {"pair": list(pair),
                                           "exchange": fitted(measured["exchange"])}


def compare(points: list[dict], machine: costmodel.Machine, ranks: int, hosts: int,
            per_host: int) -> dict:
    """Each Allreduce point against the closed forms; residual = model / measured - 1 of
    the algorithm MPICH runs (nonblocking and blocking)."""
    forms = {"ring": lambda n: costmodel.ring(n, ranks, machine, hosts),
             "rabenseifner": lambda n: costmodel.rabenseifner(n, ranks, machine, per_host),
             "recursive_doubling":
                 lambda n: costmodel.recursive_doubling(n, ranks, machine, per_host)}
    for p in points:
        n = p["bytes"]
        p["model_s"] = {name: form(n) for name, form in forms.items()}
        for key, measured, blocking in (("", "time_s", False), ("blocking_", "blocking_s", True)):
            model = costmodel.allreduce_time(n, ranks, machine, hosts, per_host, 4, blocking)
            p[f"{key}algorithm"] = costmodel.mpich_algorithm(n, ranks, 4, blocking, hosts)
            p[f"{key}mpich_model_s"] = model
            p[f"{key}residual"] = model / p[measured] - 1
    alpha, beta, _ = costmodel.fit([p["bytes"] for p in points], [p["time_s"] for p in points])
    return {"ranks": ranks, "hosts": hosts, "ranks_per_host": per_host, "dtype": "float32",
            "effective_alpha_s": alpha, "effective_beta_s_per_byte": beta, "points": points}


def bench_comm(comm: Comm, sizes: list[int], budget: float, most: int,
               json_out: str | None) -> dict:
    """Collective: measure, fit, compare; rank 0 prints the table (and writes the JSON)."""
    check_ranks(comm)
    names = collectives.gather_objects(comm, world.processor_name(), "an exchange of host names")
    hosts, per_host = preflight.placement(comm)
    transports = {kind: transport(pair, measure_pair(comm, pair, sizes, budget, most))
                  for kind, pair in sorted(pairs(names).items())}
    gamma = measure_gamma(comm, budget)
    result = {"ranks": comm.size, "mpi": world.library(), "hosts": hosts,
              "ranks_per_host": per_host, "sizes": sizes, "budget_s": budget,
              "transports": transports, "gamma_s_per_byte": gamma}
    machine = costmodel.machine_from(result)
    points = measure_allreduce(comm, sizes, budget, most)
    result["allreduce"] = compare(points, machine, comm.size, len(hosts), max(per_host))
    return report(comm, result, format_comm(result), json_out)


def format_comm(r: dict) -> str:
    lines = [f"mpinn bench comm: {r['ranks']} ranks on {len(r['hosts'])} hosts "
             f"({', '.join(f'{h} x{k}' for h, k in zip(r['hosts'], r['ranks_per_host']))}); "
             f"{r['mpi']}"]
    for kind, t in r["transports"].items():
        for what, f in (("ping-pong", t), ("exchange", t["exchange"])):
            lines.append(f"{kind} {what} (ranks {t['pair'][0]}, {t['pair'][1]}): alpha "
                         f"{1e6 * f['alpha_s']:.2f} us, beta {1e12 * f['beta_s_per_byte']:.1f}"
                         f" ps/B ({f['bandwidth_mb_per_s'] or 0:,.0f} MB/s); worst residual "
                         f"{100 * f['max_abs_residual']:.0f}%")
    lines.append(f"reduction gamma {1e12 * r['gamma_s_per_byte']:.1f} ps/B; microseconds:")
    lines.append(f"{'bytes':>10} " + "".join(f"{k + ' 1-way':>11} {k + ' exch':>10} "
                                             for k in r["transports"])
                 + f"{'iallreduce':>11} {'model':>9} {'resid':>6} {'algorithm':<19}"
                 f"{'allreduce':>10} {'model':>9} {'resid':>6}")
    for i, p in enumerate(r["allreduce"]["points"]):
        pt = "".join(f"{1e6 * t['points'][i]['time_s']:11.2f} "
                     f"{1e6 * t['exchange']['points'][i]['time_s']:10.2f} "
                     for t in r["transports"].values())
        lines.append(f"{p['bytes']:>10} {pt}{1e6 * p['time_s']:11.2f} "
                     f"{1e6 * p['mpich_model_s']:9.2f} {100 * p['residual']:5.0f}% "
                     f"{p['algorithm']:<19}{1e6 * p['blocking_s']:10.2f} "
                     f"{1e6 * p['blocking_mpich_model_s']:9.2f} "
                     f"{100 * p['blocking_residual']:5.0f}%")
    return "\n".join(lines)
