"""The cost model: alpha-beta fits, MPICH's Allreduce algorithms in closed form, and the
predicted training step at any rank count. Pure arithmetic: no MPI, no files.

Notation. A message of m bytes over a link costs alpha + m * beta (alpha: latency in s,
beta: inverse bandwidth in s/byte); adding m bytes costs m * gamma. Links are `shm`
(two ranks on one host) or `net` (ranks on different hosts). P ranks run on H hosts, K
per host, placed in blocks (ranks 0..K-1 on the first host, as mpiexec and srun do).

Which algorithm MPICH 4.x/5.x (ch4, the pip `mpich` wheel, 5.0.2) runs, read from its
source (maint/tuning/coll/mpir/generic.json, ch4/generic.json, ch4_coll.h, ucx_coll.h)
and confirmed by pinning the cvars (see `bench comm` and the validation notes):

* MPI_Iallreduce, which mpinn's gradient sync uses: ch4 hands it to the netmod, which
  calls MPIR_Iallreduce_impl; its selection is flat over all P ranks (no node-aware
  branch): recursive doubling when n <= 2048 bytes or count < pof2(P), else
  reduce-scatter + allgather (Rabenseifner: recursive halving, then doubling; the
  step of mask 2^k talks to the rank at distance 2^k, so with block placement the
  first log2(K) steps stay on the host and the rest cross the network).
* MPI_Allreduce (blocking): all ranks on one host -> the POSIX shared-memory
  release/gather algorithm (after MPIR_CVAR_POSIX_NUM_COLLS_THRESHOLD = 5 calls);
  several hosts -> "composition alpha": reduce to a leader per host over shm, the
  leaders' MPIR_Allreduce (recursive doubling for n <= 8 bytes or count < pof2(H),
  else Rabenseifner) over the network, then a broadcast on each host.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mpinn.perf.overlap import bucket_schedule, exposed_sync

ISEND_SMALL = 2048  # bytes: MPICH's Iallreduce uses recursive doubling up to this size
LARGE_SPAN = 256  # Allreduce sizes within 1/256 of the largest measured refit beta


@dataclass(frozen=True)
class Link:
    """One transport's latency alpha (s) and inverse bandwidth beta (s/byte)."""

    alpha: float
    beta: float

    def time(self, nbytes: float) -> float:
        """alpha + nbytes * beta: one message."""
        return self.alpha + nbytes * self.beta


@dataclass(frozen=True)
class Machine:
    """The links of a machine and its reduction cost gamma (s/byte added)."""

    shm: Link
    net: Link
    gamma: float


def fit(sizes: np.ndarray | list, times: np.ndarray | list
        ) -> tuple[float, float, np.ndarray]:
    """Least squares of t = alpha + n * beta, weighted by 1/t (relative errors), so the
    8-byte latencies count as much as the 64 MB transfers; alpha, beta >= 0.

    Returns (alpha, beta, residuals) with residuals = fitted / measured - 1 per size.
    """
    n, t = np.asarray(sizes, np.float64), np.asarray(times, np.float64)
    if n.shape != t.shape or len(n) < 2 or np.any(t <= 0):
        raise ValueError("fit needs at least two sizes with positive times")
    design = np.stack([np.ones_like(n), n], axis=1) / t[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
    # neither a latency nor a cost per byte is negative (noise can tilt the line so):
    # then the best fit with that term at zero
    if beta < 0:
        alpha, beta = np.sum(1 / t) / np.sum(1 / t ** 2), 0.0
    elif alpha < 0:
        alpha, beta = 0.0, np.sum(n / t) / np.sum((n / t) ** 2)
    return float(alpha), float(beta), (alpha + beta * n) / t - 1


def pof2(p: int) -> int:
    """The largest power of two <= p."""
    return 1 << (p.bit_length() - 1)


def step_links(ranks: int, ranks_per_host: int, machine: Machine) -> list[tuple[Link, int]]:
    """(link, flows sharing a host's network link) for the steps mask = 1, 2, 4 .. of a
    recursive halving/doubling over pof2(ranks) ranks in block placement: partners at
    distance mask share a host (shm) when K is a multiple of 2 mask; otherwise some cross
    the network, the step waits for them, and all K ranks of a host send at once, so K
    flows share the host's link."""
    k = max(1, ranks_per_host)
    steps, mask = [], 1
    while mask < pof2(ranks):
        # rank r and r ^ mask share a host for every r only if K is a multiple of 2 mask
        # (K = 6: the step of mask 2 pairs rank 4 with rank 6, on the next host)
        one_host = k >= ranks or k % (2 * mask) == 0
        steps.append((machine.shm, 1) if one_host else (machine.net, k))
        mask <<= 1
    return steps


def fold_cost(nbytes: float, ranks: int, ranks_per_host: int, machine: Machine) -> float:
    """The extra cost when P is not a power of two: the first 2r ranks (r = P - pof2(P))
    fold pairwise before and unfold after: 2 (alpha + n beta) + n gamma."""
    if ranks == pof2(ranks):
        return 0.0
    link = machine.shm if ranks_per_host > 1 else machine.net
    return 2 * link.time(nbytes) + nbytes * machine.gamma


def recursive_doubling(nbytes: float, ranks: int, machine: Machine,
                       ranks_per_host: int = 0) -> float:
    """Recursive doubling: log2 P exchanges of the whole vector, each followed by a sum:

        T = sum_k (alpha_k + n beta_k) + log2(P) n gamma    (+ fold_cost if P != 2^j)

    ranks_per_host 0 means all ranks on one host."""
    if ranks <= 1:
        return 0.0
    k = ranks_per_host or ranks
    steps = step_links(ranks, k, machine)
    return (sum(link.alpha + flows * nbytes * link.beta for link, flows in steps)
            + len(steps) * nbytes * machine.gamma + fold_cost(nbytes, ranks, k, machine))


def rabenseifner(nbytes: float, ranks: int, machine: Machine, ranks_per_host: int = 0) -> float:
    """Reduce-scatter by recursive halving, then allgather by recursive doubling. Step k
    (mask 2^k) sends and receives m_k = n / 2^(k+1) bytes, in both phases:

        T = sum_k [ 2 (alpha_k + m_k beta_k) + m_k gamma ]    (+ fold_cost if P != 2^j)

    On one link: 2 log2(P) alpha + 2 (P-1)/P n beta + (P-1)/P n gamma; at P = 2:
    2 (alpha + n/2 beta) + n/2 gamma."""
    if ranks <= 1:
        return 0.0
    k = ranks_per_host or ranks
    total, part = 0.0, nbytes
    for link, flows in step_links(ranks, k, machine):
        part /= 2
        total += 2 * (link.alpha + flows * part * link.beta) + part * machine.gamma
    return total + fold_cost(nbytes, ranks, k, machine)


def ring(nbytes: float, ranks: int, machine: Machine, hosts: int = 1) -> float:
    """Ring reduce-scatter + allgather: 2 (P-1) steps of n/P bytes to the next rank, all
    ranks at once, so every step waits for the slowest link in the ring (the network as
    soon as H > 1; one flow per host link: only a host's last rank sends off the host):

        T = 2 (P-1) (alpha + n/P beta) + (P-1)/P n gamma"""
    if ranks <= 1:
        return 0.0
    link = machine.net if hosts > 1 else machine.shm
    share = nbytes / ranks
    return 2 * (ranks - 1) * link.time(share) + (ranks - 1) * share * machine.gamma


def shm_reduce_bcast(nbytes: float, ranks: int, machine: Machine) -> float:
    """MPICH's POSIX release/gather on one host: every rank copies its vector into shared
    cells, the root adds them, the root's result is copied out by every rank:

        T = 2 alpha_s + 2 n beta_s + (K-1) n gamma"""
    if ranks <= 1:
        return 0.0
    shm = machine.shm
    return 2 * shm.alpha + 2 * nbytes * shm.beta + (ranks - 1) * nbytes * machine.gamma


def mpich_algorithm(nbytes: float, ranks: int, itemsize: int = 4, blocking: bool = False,
                    hosts: int = 1) -> str:
    """The Allreduce algorithm MPICH 5 (ch4) selects (module docstring has the evidence):

    Iallreduce (blocking=False): 'recursive_doubling' if n <= 2048 bytes or
    count < pof2(P), else 'rabenseifner' (reduce-scatter + allgather).
    Allreduce: 'shm_release_gather' on one host; across hosts 'composition_alpha'
    (shm reduce, leaders' recursive doubling or Rabenseifner, shm broadcast)."""
    if ranks <= 1:
        return "none"
    if blocking:
        return "shm_release_gather" if hosts <= 1 else "composition_alpha"
    if nbytes <= ISEND_SMALL or nbytes // itemsize < pof2(ranks):
        return "recursive_doubling"
    return "rabenseifner"


def allreduce_time(nbytes: float, ranks: int, machine: Machine, hosts: int = 1,
                   ranks_per_host: int = 0, itemsize: int = 4, blocking: bool = False) -> float:
    """Seconds of the Allreduce MPICH runs for n bytes over P ranks on H hosts x K
    (K = ranks_per_host, default P / H), per mpich_algorithm. Composition alpha:

        T = T_shm(reduce + bcast over K) + T_leaders(n, H over the network)"""
    k = ranks_per_host or max(1, ranks // max(1, hosts))
    algorithm = mpich_algorithm(nbytes, ranks, itemsize, blocking, hosts)
    if algorithm == "none":
        return 0.0
    if algorithm == "shm_release_gather":
        return shm_reduce_bcast(nbytes, ranks, machine)
    if algorithm == "composition_alpha":
        small = nbytes <= 8 or nbytes // itemsize < pof2(hosts)
        leaders = (recursive_doubling if small else rabenseifner)(nbytes, hosts, machine, 1)
        return shm_reduce_bcast(nbytes, k, machine) + leaders
    form = recursive_doubling if algorithm == "recursive_doubling" else rabenseifner
    return form(nbytes, ranks, machine, k if hosts > 1 else ranks)


def wire_time(elements: float, ranks: int, machine: Machine, hosts: int = 1,
              ranks_per_host: int = 0, wire_itemsize: int = 2) -> float:
    """Seconds of the half-precision sync's messages for a bucket of n elements (comm/
    wire.py) over P ranks, K per host: an all-to-all and an all-gather of P chunks of
    c = n / P elements, each P - 1 messages of c w bytes in turn, K - 1 of them within
    the host and P - K over the network, whose link the host's K ranks share; and the
    owner's sum of P chunks (gamma per byte added). The casts are CPU time the caller
    adds. (The chunks cross the network without a reduction within the host first: with
    K > 1 the network carries as many bytes as MPICH's two-level float32 Allreduce.)"""
    if ranks < 2:
        return 0.0
    k = ranks_per_host or max(1, ranks // max(1, hosts))
    chunk = elements / ranks * wire_itemsize
    net = (ranks - k) * (machine.net.alpha + k * chunk * machine.net.beta) if hosts > 1 else 0
    shm = (k - 1) * machine.shm.time(chunk)
    return 2 * (net + shm) + machine.gamma * ranks * chunk


def machine_from(comm: dict) -> Machine:
    """A Machine from `mpinn bench comm` JSON: each transport's exchange fit (both
    directions at once, as in every step of the Allreduce), else its ping-pong fit, with
    the beta of the transport its Allreduce ran over refitted to the Allreduce's large
    messages (allreduce_beta). A transport it did not measure takes the other's figures
    (a one-host bench knows no network: give one to project beyond)."""
    found = {}
    for name, t in comm["transports"].items():
        f = t.get("exchange", t)
        found[name] = Link(f["alpha_s"], f["beta_s_per_byte"])
    if not found:
        raise ValueError("the bench comm results hold no transport")
    measured = comm.get("allreduce")
    if measured:
        kind = "net" if measured["hosts"] > 1 else "shm"
        if kind in found and (measured["hosts"] == 1 or measured["ranks_per_host"] == 1):
            found[kind] = allreduce_beta(measured, found[kind], comm["gamma_s_per_byte"])
    fallback = found.get("net") or found["shm"]
    return Machine(shm=found.get("shm", fallback), net=found.get("net", fallback),
                   gamma=comm["gamma_s_per_byte"])


def allreduce_beta(measured: dict, link: Link, gamma: float) -> Link:
    """The link with beta refitted to the measured Iallreduce over it (one transport: one
    host, or one rank per host), alpha kept (the point-to-point latency). Over the large
    messages (within LARGE_SPAN of the largest) that MPICH reduces with Rabenseifner,

        T_i = 2 log2(P) alpha + 2 (P-1)/P n_i beta + (P-1)/P n_i gamma,

    beta by least squares of relative errors. This folds into beta what the algorithm
    costs beyond its messages (buffer copies, page faults, cache misses), which
    ping-pongs do not show. Unchanged if P is not a power of two or too few points."""
    p = measured["ranks"]
    if p < 2 or p != pof2(p):
        return link
    points = [q for q in measured["points"]
              if mpich_algorithm(q["bytes"], p) == "rabenseifner" and q["time_s"] > 0]
    top = max((q["bytes"] for q in points), default=0)
    points = [q for q in points if q["bytes"] * LARGE_SPAN >= top]
    if len(points) < 2:
        return link
    share = (p - 1) / p
    latency = 2 * math.log2(p) * link.alpha
    weights = [1 / q["time_s"] ** 2 for q in points]
    slopes = [2 * share * q["bytes"] for q in points]
    rests = [q["time_s"] - latency - share * q["bytes"] * gamma for q in points]
    beta = (sum(w * b * r for w, b, r in zip(weights, slopes, rests))
            / sum(w * b * b for w, b in zip(weights, slopes)))
    return Link(link.alpha, beta) if beta > 0 else link


@dataclass(frozen=True)
class Compute:
    """Forward + backward seconds of a rank on b rows, c0 + c1 b (fitted by `bench step
    --local-batches`), the backward share of it, and the per-step update and data time."""

    c0: float
    c1: float
    backward_fraction: float
    update: float
    data: float = 0.0

    def time(self, rows: int) -> float:
        return self.c0 + self.c1 * rows

    @classmethod
    def from_bench(cls, step: dict) -> Compute:
        """From `mpinn bench step` JSON: its compute_fit, or (older JSON) the measured
        forward + backward scaled linearly from its own local batch.

        The fit times the model's forward and backward calls alone, the median of its
        steps; a training step also computes the loss and its gradient, checks its rows,
        counts the confusion matrix, and its mean carries the machine's noise. So the
        fit gives the shape in b, and the bench's own training steps (forward + backward
        of the slowest rank, mean over steps, at its local batch b0) the level:
        compute(b) = (c0 + c1 b) x measured(b0) / (c0 + c1 b0)."""
        phases = {k: v["max"] for k, v in step["step_time_s"].items()}
        work = phases["forward"] + phases["backward"]
        rows = math.ceil(step["batch_size"] / step["ranks"])
        fit_ = step.get("compute_fit")
        if fit_:
            c0, c1 = fit_["c0_s"], fit_["c1_s_per_row"]
            share = fit_["backward_fraction"]
            fitted = c0 + c1 * rows
            if work > 0 and fitted > 0:
                c0, c1 = c0 * work / fitted, c1 * work / fitted
        else:
            c0, c1 = 0.0, work / rows
            share = phases["backward"] / work if work else 0.5
        return cls(c0, c1, share, phases["update"], phases.get("data", 0.0))


def predict_step(bench_step: dict, comm: dict | None, global_batch: int, ranks: int, hosts: int,
                 ranks_per_host: int, n_bytes: int) -> dict:
    """Predicted seconds per phase of a synchronous step (the slowest rank's share,
    ceil(B/P) rows) and the total, with the sync after backward (blocking) and
    overlapped with it:

        T(P)         = data + compute(ceil(B/P)) + update + allreduce(n, P, H, K)
        T_overlap(P) = data + forward + backward + exposed + update

    exposed: the buckets' schedule (overlap.py) on the α-β link, with
    the bench's --bucket-mb. On one host the Allreduce is CPU work that does not
    overlap: T_overlap = T. A bench JSON without the model gives the bound
    max(backward, allreduce) instead of the schedule."""
    if min(global_batch, ranks, hosts, ranks_per_host, n_bytes) < 1:
        raise ValueError("global_batch, ranks, hosts, ranks_per_host, n_bytes must be >= 1")
    work = Compute.from_bench(bench_step)
    rows = math.ceil(global_batch / ranks)
    compute = work.time(rows)
    backward = compute * work.backward_fraction
    itemsize = 8 if bench_step.get("dtype") == "float64" else 4
    sync = sync_model(bench_step, comm, ranks, hosts, ranks_per_host, itemsize)
    allreduce = sync(n_bytes) if ranks > 1 else 0.0  # one rank: no sync, no need of comm
    forward = compute - backward
    backward += bench_step.get("cast_s", 0.0) if ranks > 1 else 0.0  # (half precision)
    phases = {"data": work.data, "forward": forward, "backward": backward,
              "allreduce": allreduce, "update": work.update}
    total = sum(phases.values())
    if ranks == 1 or hosts == 1:
        overlap = total
    elif "model" not in bench_step:
        overlap = total - backward - allreduce + max(backward, allreduce)
    else:
        buckets = bucket_schedule(bench_step["model"], itemsize,
                                  bench_step.get("bucket_mb", 1.0) * 1e6)
        overlap = total - allreduce + exposed_sync(backward, buckets, sync)
    return {"phases": phases, "step_s": total, "step_overlap_s": overlap,
            "local_batch": rows, "algorithm": mpich_algorithm(n_bytes, ranks, itemsize)}


def sync_model(bench_step: dict, comm: dict | None, ranks: int, hosts: int,
               ranks_per_host: int, itemsize: int) -> Callable[[float], float]:
    """Seconds of the sync of n bytes of gradients: MPICH's Allreduce, or with the bench's
    --sync-dtype float16/bfloat16 the all-to-all and all-gather of half the bytes."""
    if ranks < 2:
        return lambda nbytes: 0.0
    machine = machine_from(comm)
    if bench_step.get("sync_dtype", "model") != "model":
        return lambda nbytes: wire_time(nbytes / itemsize, ranks, machine, hosts,
                                        ranks_per_host)
    return lambda nbytes: allreduce_time(nbytes, ranks, machine, hosts, ranks_per_host,
                                         itemsize)


def project(bench_step: dict, comm: dict, global_batch: int, n_bytes: int,
            ranks_per_host: int = 1, max_ranks: int = 4096, mode: str = "strong"
            ) -> list[dict]:
    """Efficiency and samples/s at P = 1, 2, 4 .. max_ranks (K per host, so H = P / K).

    Strong scaling keeps the global batch B: efficiency = T(1) / (P T(P)). Weak keeps
    the rows per rank (global batch B P): efficiency = T(1) / T(P). The `_overlap`
    figures use max(backward, allreduce): what overlapping would at most gain."""
    if mode not in ("strong", "weak"):
        raise ValueError(f"mode must be strong or weak, not {mode!r}")
    rows, base = [], None
    p = 1
    # strong scaling ends where ranks outnumber the batch's rows (ranks without a row)
    while p <= max_ranks and (mode == "weak" or p <= global_batch):
        k = min(ranks_per_host, p)
        batch = global_batch if mode == "strong" else global_batch * p
        step = predict_step(bench_step, comm, batch, p, math.ceil(p / k), k, n_bytes)
        base = base or step
        scale = p if mode == "strong" else 1
        rows.append({"ranks": p, "hosts": math.ceil(p / k), "global_batch": batch,
                     "step_s": step["step_s"], "samples_per_s": batch / step["step_s"],
                     "efficiency": base["step_s"] / (scale * step["step_s"]),
                     "step_overlap_s": step["step_overlap_s"],
                     "samples_per_s_overlap": batch / step["step_overlap_s"],
                     "efficiency_overlap": base["step_overlap_s"]
                     / (scale * step["step_overlap_s"]),
                     "allreduce_s": step["phases"]["allreduce"]})
        p *= 2
    return rows
