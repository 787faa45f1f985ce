"""Benchmarks: `mpinn bench step` (run it under mpiexec), and what every benchmark
shares (report).

Training steps on in-memory data, as training runs them: compute against a GEMM's
speed, the gradient sync (in flight during backward, and exposed after it) against a
bare MPI Allreduce of the same bytes, the update, anonymous memory per rank against
the model's own bytes; with --local-batches, the compute per rank against its rows
(the cost model's input). `mpinn bench io` is benchio.py, `bench comm` benchcomm.py.
"""

from __future__ import annotations

import time

import numpy as np

from mpinn.base.errors import UsageError
from mpinn.base.files import text_stream, write_json
from mpinn.comm import collectives, console, measure, preflight, watchdog, world
from mpinn.comm.gradsync import GradientSync
from mpinn.comm.world import Comm
from mpinn.data.feed import Batch
from mpinn.data.layout import DatasetInfo, Problem
from mpinn.data.sampler import ceil_div, share
from mpinn.nn.fixed import Budget
from mpinn.nn.model import MLP, Architecture
from mpinn.nn.optim import make_optimizer
from mpinn.perf import costmodel
from mpinn.run.config import TrainConfig
from mpinn.train.session import build_model
from mpinn.train.step import Learner, train_step, update_cast
from mpinn.train.timing import PhaseTimer


def report(comm: Comm, result: dict, text: str, json_out: str | None) -> dict:
    """Rank 0 prints the table and, if asked, writes the results as JSON (`--json -`:
    to standard output, and the table to standard error)."""
    console.print0(comm, text, file=text_stream(json_out))
    if json_out:
        collectives.root_tries(comm, lambda: write_json(json_out, result, indent=2))
    return result


def gemm_peak(rows: int, dtype: str, repeats: int = 20) -> float:
    """GFLOP/s of one (rows x 1024) @ (1024 x 1024) GEMM on this rank: the ceiling of a step."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((rows, 1024)).astype(dtype)
    b = rng.standard_normal((1024, 1024)).astype(dtype)
    out = np.empty((rows, 1024), dtype)
    np.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - began)
    return 2 * rows * 1024 * 1024 / best / 1e9


def local_batches(text: str) -> list[int]:
    """--local-batches '64,128,256': at least two distinct positive row counts."""
    try:
        rows = sorted({int(s) for s in text.split(",")})
    except ValueError:
        rows = []
    if len(rows) < 2 or rows[0] < 1 or rows[-1] > 1 << 16:
        raise UsageError(f"--local-batches: at least two row counts from 1 to 65536, comma "
                         f"separated (e.g. 64,128,256,512), not {text!r}")
    return rows


def compute_fit(comm: Comm, arch: Architecture, local_batches: list[int], steps: int
                ) -> dict:
    """Collective: forward + backward seconds on b rows for each local batch b, every rank
    at once (as in training: ranks that share a host slow each other down), the slowest
    rank's median over `steps` (after a warm-up); fitted as c0 + c1 b (costmodel.fit)."""
    model = MLP(arch, max(local_batches))
    model.init(np.random.default_rng(3))
    rng = np.random.default_rng(4)
    x = rng.standard_normal((max(local_batches), arch.sizes[0])).astype(np.float32)
    y = rng.integers(0, arch.sizes[-1], len(x))
    times = np.zeros((len(local_batches), 2))  # forward, backward
    for i, b in enumerate(local_batches):
        collectives.barrier(comm)
        samples = np.zeros((steps + 1, 2))
        for k in range(steps + 1):  # the first is the warm-up
            began = time.perf_counter()
            model.forward(x[:b])
            middle = time.perf_counter()
            model.backward(y[:b])
            samples[k] = (middle - began, time.perf_counter() - middle)
        # the median step: a burst of another process on a shared core is not the model's
        times[i] = np.median(samples[1:], axis=0)
    collectives.allreduce_max(comm, times, "the compute times")
    total = times.sum(axis=1)
    c0, c1, residuals = costmodel.fit(local_batches, total)
    return {"concurrent_ranks": comm.size, "local_batches": local_batches,
            "forward_s": times[:, 0].tolist(), "backward_s": times[:, 1].tolist(),
            "c0_s": c0, "c1_s_per_row": c1, "residuals": residuals.tolist(),
            "backward_fraction": float(times[:, 1].sum() / total.sum())}


def new_learner(comm: Comm, arch: Architecture, rows: int, problem: Problem, optimizer: str,
                lr: float, seed: int, sync_mode: str = "overlap",
                bucket_mb: float = TrainConfig.bucket_mb, sync_dtype: str = "model",
                shard: bool = False,
                budget: Budget | None = None) -> Learner:
    """A learner for up to `rows` rows per rank: the model around a gradient sync,
    initialised from the seed, and the optimizer (of this rank's slice if shard); with a
    budget, --reproducible's (an ExactMLP and an exact sync)."""
    sync = GradientSync(comm, arch.n_params, arch.dtype, sync_mode, int(bucket_mb * 1e6),
                        test_in_flight=len(preflight.placement(comm)[0]) > 1,
                        wire=None if sync_dtype == "model" else sync_dtype, shard=shard,
                        exact=budget.exponents if budget else 0)
    model = build_model(arch, rows, sync, budget)
    model.init(np.random.default_rng(seed))
    owned = model.params[sync.shards.lo:sync.shards.hi] if shard else model.params
    return Learner(model, make_optimizer(optimizer, owned, lr, 0.0, 0.9), sync, problem,
                   cast=update_cast(model, owned))


def bench_step(comm: Comm, features: int, hidden: tuple[int, ...], classes: int,
               batch: int, steps: int, dtype: str, json_out: str | None,
               local_batches: list[int] | None = None, optimizer_name: str = "sgd",
               sync_mode: str = "overlap", bucket_mb: float = TrainConfig.bucket_mb,
               sync_dtype: str = "model", shard: bool = False,
               reproducible: bool = False) -> dict:
    """Training steps on in-memory data: compute vs GEMM peak; the gradient sync in flight
    and exposed (the wait after backward) vs a bare MPI Allreduce of its bytes; the
    update; anonymous memory per rank vs the model's parameters. With local_batches
    also the compute fit of the cost model (compute_fit). With reproducible, also
    --reproducible's steps on the same rows, each after a normal one (paired), against
    them: per phase, and the time spent putting tensors on their grids."""
    rows = ceil_div(batch, comm.size)
    lo, hi = share(batch, comm.rank, comm.size)  # this rank's rows, as in training
    arch = Architecture((features, *hidden, classes), dtype=dtype)
    problem = Problem(DatasetInfo("(random, in memory)", batch, 0, features, "classification",
                                  classes), classes)
    learner = new_learner(comm, arch, rows, problem, optimizer_name, 1e-3, 1, sync_mode,
                          bucket_mb, sync_dtype, shard)
    sync = learner.sync
    rng = np.random.default_rng(2)
    rows_here = Batch.in_memory(rng.standard_normal((hi - lo, features)).astype(np.float32),
                                rng.integers(0, classes, hi - lo), batch)
    exact = new_learner(comm, arch, rows, problem, optimizer_name, 1e-3, 1, sync_mode,
                        bucket_mb, sync_dtype, shard, Budget.plan(arch.sizes, batch)) \
        if reproducible else None
    timer, exact_timer, cast, grids = run_steps(comm, learner, exact, rows_here, steps)
    times = timer.reduce_all(comm)
    phases = times.phases
    memory = np.array([anonymous_memory()])
    collectives.allreduce_max(comm, memory)
    raw = bare_seconds(comm, sync.buffer, steps)
    layer_flops = sum(fi * fo for fi, fo in zip(arch.sizes[:-1], arch.sizes[1:]))
    # forward 2 n sum(fi fo); backward 4 n sum(fi fo) less the input layer's delta
    flops = (hi - lo) * (6 * layer_flops - 2 * arch.sizes[0] * arch.sizes[1])
    compute = phases["forward"]["max"] + phases["backward"]["max"]
    peak = np.array([gemm_peak(rows, dtype)])
    collectives.allreduce_sum(comm, peak)
    per_rank_gflops = flops / compute / 1e9 if compute else float("nan")
    result = {"ranks": comm.size, "mpi": world.library(), "model": list(arch.sizes),
              "batch_size": batch, "dtype": dtype, "steps": steps, "optimizer": optimizer_name,
              "step_time_s": phases, "samples_per_s": batch / sum(
                  p["max"] for p in phases.values()),
              "compute_gflops_per_rank": per_rank_gflops,
              "gemm_peak_gflops_per_rank": peak[0] / comm.size,
              "compute_vs_gemm_peak": per_rank_gflops / (peak[0] / comm.size),
              "sync": sync_mode, "bucket_mb": bucket_mb,
              **sync_figures(comm, sync, times, raw[0], cast),
              "update_s": phases["update"]["max"], "shard_optimizer": shard,
              "allgather_s": phases["allgather"]["max"],
              "optimizer_bytes_per_rank": learner.optimizer.nbytes,
              **memory_figures(memory[0], arch)}
    if exact is not None:
        result["reproducible"] = exact_figures(comm, exact, exact_timer, phases, grids)
    if local_batches:
        result["compute_fit"] = compute_fit(comm, arch, local_batches, steps)
    return report(comm, result, format_step(result), json_out)


def run_steps(comm: Comm, learner: Learner, exact: Learner | None, batch: Batch, steps: int
              ) -> tuple[PhaseTimer, PhaseTimer, float, float]:
    """steps + 1 training steps (the first, a warm-up, left out of the figures), each
    followed by one of exact's (--reproducible) if given. Returns the timers and the
    seconds per step of the half-precision casts and of exact's grids."""
    timer, exact_timer = PhaseTimer(), PhaseTimer()
    # as in training: the Allreduce is non-blocking, completed by the stall watchdog's loop
    with watchdog.watching(comm, 600, lambda: False, lambda: "mpinn bench step"):
        cast, grids = 0.0, 0.0
        for step in range(steps + 1):
            timed_step(learner, batch, timer)
            cast += learner.sync.cast_s if step else 0.0
            if exact is not None:
                grids -= exact.model.grid_s if step == 1 else 0.0  # (ExactMLP's)
                timed_step(exact, batch, exact_timer)
    if exact is not None:
        grids += exact.model.grid_s
    return timer, exact_timer, cast / steps, grids / steps


def timed_step(learner: Learner, batch: Batch, timer: PhaseTimer) -> None:
    timer.begin_step()
    train_step(learner, batch, timer)
    timer.end_step(batch.rows)


def exact_figures(comm: Comm, exact: Learner, timer: PhaseTimer, normal: dict,
                  grids: float) -> dict:
    """Collective: --reproducible's step against the normal one (phases: the normal
    step's), phase by phase, and its seconds per step on grids (the slowest rank's)."""
    phases = timer.reduce_all(comm).phases
    spent = np.array([grids])
    collectives.allreduce_max(comm, spent)
    step, base = (sum(p["max"] for p in ph.values()) for ph in (phases, normal))
    return {"step_time_s": phases, "step_s": step, "vs_normal": step / base,
            "phase_vs_normal": {k: phases[k]["max"] / v["max"] if v["max"] else None
                                for k, v in normal.items()},
            "grids_s": float(spent[0]), "redone_steps": exact.redos[0],
            "bits": exact.model.budget.describe()}


def sync_figures(comm: Comm, sync: GradientSync, times, raw: float, cast: float) -> dict:
    """The gradient sync's figures: its bytes, and its time in flight (first send to
    completion) and exposed (the wait after backward) against a bare Allreduce of the
    same bytes (P = 1: no sync)."""
    exposed = times.phases["allreduce"]["max"]
    return {"allreduce_bytes": sync.buffer.nbytes, "sync_buckets": len(sync.buckets),
            # what each rank sends of the gradients per step, and the half-precision
            # sync's conversions and local sums (seconds per step)
            "sync_dtype": "model" if sync.wire is None else str(sync.wire.wire),
            "sent_bytes_per_step": sync.sent_bytes, "cast_s": cast,
            "sync_s": times.sync["max"], "sync_exposed_s": exposed, "raw_allreduce_s": raw,
            "sync_vs_raw": times.sync["max"] / raw if comm.size > 1 else None,
            "exposed_vs_raw": exposed / raw if comm.size > 1 else None}


def bare_seconds(comm: Comm, like: np.ndarray, steps: int) -> np.ndarray:
    """Collective: raw MPI, the same bytes as `like`, the blocking call, in a tight loop
    (no computation around it): seconds per call, the slowest rank's."""
    buf = np.zeros_like(like)
    collectives.barrier(comm)
    began = time.perf_counter()
    for _ in range(steps):
        measure.bare_allreduce(comm, buf)
    raw = np.array([(time.perf_counter() - began) / steps])
    collectives.allreduce_max(comm, raw)
    return raw


def format_step(r: dict) -> str:
    p = r["step_time_s"]
    return "\n".join([
        f"mpinn bench step: model {'-'.join(map(str, r['model']))} {r['dtype']}, global batch "
        f"{r['batch_size']}, {r['ranks']} ranks, {r['steps']} steps ({r['mpi']})",
        "ms per step (max over ranks): " + ", ".join(f"{k} {1e3 * v['max']:.3f}"
                                                       for k, v in p.items()),
        f"compute: {r['compute_gflops_per_rank']:.1f} GFLOP/s per rank = "
        f"{r['compute_vs_gemm_peak']:.2f} x a {r['gemm_peak_gflops_per_rank']:.1f} GFLOP/s GEMM",
        format_sync(r),
        f"update: {1e3 * r['update_s']:.3f} ms ({r['optimizer']}"
        + (f", of 1/{r['ranks']} of the parameters; their all-gather "
           f"{1e3 * r['allgather_s']:.3f} ms" if r["shard_optimizer"] else "")
        + f"; its arrays {r['optimizer_bytes_per_rank'] / 1e6:.2f} MB per rank); memory: "
        f"{r['anonymous_rss_bytes_per_rank'] / 1e6:.1f} MB anonymous per rank = "
        f"{r['rss_vs_model']:.1f} x the model's {r['model_bytes'] / 1e6:.2f} MB",
        f"throughput: {r['samples_per_s']:,.0f} samples/s"] + format_exact(r.get("reproducible"))
        + format_fit(r.get("compute_fit")))


def format_exact(e: dict | None) -> list[str]:
    if not e:
        return []
    return [f"--reproducible: {1e3 * e['step_s']:.3f} ms per step = {e['vs_normal']:.2f} x the "
            f"normal step (" + ", ".join(f"{k} {v:.2f} x" for k, v in
                                         e["phase_vs_normal"].items() if v is not None)
            + f"); {1e3 * e['grids_s']:.3f} ms of it putting tensors on their grids; "
            f"{e['redone_steps']} steps redone; grids: {e['bits']}"]


def format_sync(r: dict) -> str:
    head = (f"sync ({r['sync']}, {r['sync_buckets']} Allreduce"
            f"{'s' if r['sync_buckets'] > 1 else ''} of {r['allreduce_bytes'] / 1e6:.2f} MB")
    if r.get("sync_dtype", "model") != "model":
        head += (f" in {r['sync_dtype']}: {r['sent_bytes_per_step'] / 1e6:.2f} MB sent per "
                 f"rank, {1e3 * r['cast_s']:.2f} ms of casts and sums")
    head += ")"
    if r["ranks"] == 1:
        return f"{head}: one rank, nothing to exchange"
    return (f"{head}: {1e3 * r['sync_s']:.3f} ms in flight, {1e3 * r['sync_exposed_s']:.3f} ms "
            f"exposed after backward = {r['sync_vs_raw']:.2f} and {r['exposed_vs_raw']:.2f} x a "
            f"bare MPI Allreduce (blocking, {1e3 * r['raw_allreduce_s']:.3f} ms)")


def memory_figures(rss: float, arch: Architecture) -> dict:
    model = arch.n_params * np.dtype(arch.dtype).itemsize
    return {"anonymous_rss_bytes_per_rank": int(rss), "model_bytes": model,
            "rss_vs_model": rss / model}


def anonymous_memory() -> int:
    """This process's anonymous resident memory in bytes (RssAnon; 0 where /proc has none):
    what it allocated, without the mapped libraries and files."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def format_fit(f: dict | None) -> list[str]:
    if not f:
        return []
    return [f"compute fit (forward + backward, {f['concurrent_ranks']} ranks at once): "
            f"{1e3 * f['c0_s']:.3f} ms + {1e6 * f['c1_s_per_row']:.2f} us x rows; "
            f"backward {100 * f['backward_fraction']:.0f}%; residuals "
            + ", ".join(f"{b}: {100 * r:+.1f}%" for b, r in zip(f["local_batches"],
                                                               f["residuals"]))]
