"""The cost model (costmodel.py) applied to studies: every point of a sweep predicted
from the sweep's calibration (calibrate.py) and compared with its measurement, and the
projection to thousands of ranks, from a sweep or from a network the user describes
(`mpinn scaling project`). Serial, no MPI.

A point's prediction uses the bench step of its rank count (compute and update under
the same number of ranks per host), the bench comm of the sweep (alpha, beta of each
transport, gamma), the point's placement (hosts, ranks per host, from its summary:
decided by the launcher, not a measurement of speed) and its gradient buffer:

    predicted_step_s = data + compute(ceil(B/P)) + update + allreduce(n, P, H, K)
                       (with --sync overlap across hosts: the buckets' schedule,
                       costmodel.predict_step)
    prediction_error = predicted_step_s / step_s - 1
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from mpinn.base.errors import EXIT_OK, UsageError
from mpinn.base.files import read_json, write_atomically
from mpinn.perf import calibrate, caveats, costmodel
from mpinn.perf.plot import plot_projection
from mpinn.perf.scaling import child_environment, default_launcher, launcher_argv
from mpinn.perf.sweep import launch
from mpinn.run.resolve import parse_hidden

PROJECTION_COLUMNS = ("mode", "ranks", "hosts", "global_batch", "step_s", "allreduce_s",
                      "samples_per_s", "efficiency", "step_overlap_s", "samples_per_s_overlap",
                      "efficiency_overlap")


@dataclass
class Calibration:
    """A sweep's benchmarks: bench step per rank count, bench comm (None at one rank)."""

    steps: dict[int, dict]
    comm: dict | None

    def covers(self, ranks: int) -> bool:
        return ranks in self.steps and (ranks == 1 or self.comm is not None)


def load_calibration(sweep_dir: str) -> Calibration | None:
    """The calibration files of a sweep directory, or None if it has none."""
    folder = os.path.join(sweep_dir, calibrate.DIRECTORY)
    if not os.path.isdir(folder):
        return None
    steps = {}
    for name in os.listdir(folder):
        if name.startswith("step-p") and name.endswith(".json"):
            steps[int(name[len("step-p"):-len(".json")])] = read_json(
                os.path.join(folder, name), "bench step results")
    comm_path = calibrate.comm_file(sweep_dir)
    comm = read_json(comm_path, "bench comm results") if os.path.exists(comm_path) else None
    return Calibration(steps, comm) if steps else None


def predict_row(row: dict, n_bytes: int, calibration: Calibration,
                overlapped: bool = False) -> dict:
    """The prediction of one report row (report.points) and its error: of the overlapped
    step if its runs synced with --sync overlap, else of the blocking one."""
    predicted = costmodel.predict_step(
        calibration.steps[row["ranks"]], calibration.comm, row["global_batch"], row["ranks"],
        row["hosts"], row["ranks_per_host"], n_bytes)
    step = predicted["step_overlap_s" if overlapped else "step_s"]
    return {"predicted_step_s": step, "prediction_error": step / row["step_s"] - 1,
            "predicted": predicted}


def add_predictions(rows: list[dict], runs: list, calibrations: dict[str, Calibration]) -> bool:
    """Fill predicted_step_s and prediction_error of each row its runs' sweep calibrated;
    returns whether any row was predicted."""
    done = False
    for row in rows:
        group = [r for r in runs if r.mode == row["mode"] and r.ranks == row["ranks"]
                 and len(r.summary["hosts"]) == row["hosts"]
                 and max(r.summary["ranks_per_host"]) == row["ranks_per_host"]]
        sweep = next((r.sweep for r in group if r.sweep in calibrations
                      and calibrations[r.sweep].covers(row["ranks"])), None)
        if sweep is not None:
            n_bytes = group[0].summary["allreduce_bytes_per_step"]
            overlapped = all(r.summary.get("sync") == "overlap" for r in group)
            row.update(predict_row(row, n_bytes, calibrations[sweep], overlapped))
            done = True
    return done


def project(bench_step: dict, comm: dict, n_bytes: int, batches: dict[str, int],
            ranks_per_host: int, max_ranks: int) -> list[dict]:
    """costmodel.project for each mode: batches maps strong -> the global batch, weak ->
    the batch per rank."""
    rows = []
    for mode, batch in batches.items():
        for r in costmodel.project(bench_step, comm, batch, n_bytes, ranks_per_host,
                                   max_ranks, mode):
            rows.append({"mode": mode, **r})
    return rows


def sweep_projection(rows: list[dict], runs: list, calibrations: dict[str, Calibration],
                     max_ranks: int = 4096) -> tuple[list[dict], dict] | None:
    """The report's projection: the calibration of the largest rank count measured, its
    ranks per host, the sweep's batches; None without a calibration with bench comm."""
    usable = [(c, r) for r in rows for s, c in calibrations.items()
              if c.comm is not None and r["ranks"] in c.steps and r["ranks"] > 1
              and any(run.sweep == s for run in runs)]
    if not usable:
        return None
    calibration, top = max(usable, key=lambda cr: cr[1]["ranks"])
    batches = {}
    for mode in ("strong", "weak"):
        group = [r for r in rows if r["mode"] == mode]
        if group:
            batches[mode] = group[0]["global_batch"] // (1 if mode == "strong"
                                                         else group[0]["ranks"])
    n_bytes = runs[0].summary["allreduce_bytes_per_step"]
    basis = {"ranks_per_host": top["ranks_per_host"], "bench_step_ranks": top["ranks"],
             "n_bytes": n_bytes, "batches": batches, "max_ranks": max_ranks,
             "comm": calibration.comm}
    return project(calibration.steps[top["ranks"]], calibration.comm, n_bytes, batches,
                   top["ranks_per_host"], max_ranks), basis


def described_comm(alpha: float, beta: float, gamma: float, shm: tuple[float, float] | None
                   ) -> dict:
    """A bench comm result for a network the user describes (mpinn scaling project)."""
    source = "as described to mpinn scaling project"
    transports = {"net": {"alpha_s": alpha, "beta_s_per_byte": beta, "source": source}}
    if shm is not None:
        transports["shm"] = {"alpha_s": shm[0], "beta_s_per_byte": shm[1], "source": source}
    return {"transports": transports, "gamma_s_per_byte": gamma}


def shown_ranks(rows: list[dict]) -> list[dict]:
    """The projection's rows at P = 1, 4, 16, ... and the last (a table to read)."""
    top = max(r["ranks"] for r in rows)
    return [r for r in rows if r["ranks"] in (1, top) or (r["ranks"].bit_length() - 1) % 2 == 0]


def projection_table(rows: list[dict]) -> list[str]:
    """Markdown: the projected step, samples/s and efficiency, with the overlap bound."""
    lines = ["| mode | ranks | hosts | global batch | step ms | Allreduce ms | samples/s "
             "| efficiency | with overlap: samples/s | efficiency |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in shown_ranks(rows):
        lines.append(f"| {r['mode']} | {r['ranks']} | {r['hosts']} | {r['global_batch']} | "
                     f"{r['step_s'] * 1e3:.3g} | {r['allreduce_s'] * 1e3:.3g} | "
                     f"{r['samples_per_s']:,.0f} | {r['efficiency']:.3f} | "
                     f"{r['samples_per_s_overlap']:,.0f} | {r['efficiency_overlap']:.3f} |")
    return lines


def prediction_table(rows: list[dict]) -> list[str]:
    """Markdown: every point's measured and predicted step, per phase."""
    lines = ["| mode | ranks | hosts x ranks/host | measured step ms | predicted ms | error "
             "| predicted compute ms | measured compute ms | predicted Allreduce ms "
             "| measured Allreduce ms | algorithm |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "predicted" not in r:
            continue
        p = r["predicted"]["phases"]
        lines.append(
            f"| {r['mode']} | {r['ranks']} | {r['hosts']} x {r['ranks_per_host']} | "
            f"{r['step_s'] * 1e3:.3g} | {r['predicted_step_s'] * 1e3:.3g} | "
            f"{100 * r['prediction_error']:+.1f}% | "
            f"{(p['forward'] + p['backward']) * 1e3:.3g} | "
            f"{(r['forward_s'] + r['backward_s']) * 1e3:.3g} | {p['allreduce'] * 1e3:.3g} | "
            f"{r['allreduce_s'] * 1e3:.3g} | {r['predicted']['algorithm']} |")
    return lines


def prediction_section(rows: list[dict], image: str | None) -> list[str]:
    """report.md's comparison of the model with the measurement."""
    errors = [abs(r["prediction_error"]) for r in rows if "predicted" in r]
    return ["## Predicted against measured", "",
            "The cost model predicts each point from the sweep's calibration (bench step at "
            "the point's rank count, bench comm at the largest) and the point's placement, "
            "without its own timings: data + compute(ceil(B/P)) + update + the Allreduce "
            "MPICH runs at that size and P. Error = predicted / measured - 1; largest "
            f"|error| {100 * max(errors):.1f}%"
            + (f", above the {100 * caveats.MAX_PREDICTION_ERROR:.0f}% the model aims for "
               f"(see the warnings)" if max(errors) > caveats.MAX_PREDICTION_ERROR else "")
            + ".", "", *prediction_table(rows), ""] + (
        [f"![prediction]({image})", ""] if image else [])


def projection_section(projection: list[dict], basis: dict, image: str | None) -> list[str]:
    """report.md's projection to max_ranks, labelled with the links it rests on (measured
    by the sweep's bench comm, described by the user, or borrowed from shared memory)."""
    label, links = caveats.link_sources(basis["comm"])
    text = (f"From the compute of {basis['bench_step_ranks']} rank(s) at once, with "
            f"{basis['ranks_per_host']} ranks per host and the Allreduce of "
            f"{basis['n_bytes']:,} bytes, over the links above: strong scaling keeps the "
            f"global batch, weak the batch per rank. 'With overlap' is the bound if the "
            f"Allreduce overlapped backward completely: max(backward, Allreduce) instead of "
            f"their sum.")
    return ["## Projection", "", f"**Links: {label}.**", "", *(f"- {line}" for line in links),
            "", text, "", *projection_table(projection), ""] + (
        [f"![projection]({image})", ""] if image else [])


def serial_gamma() -> float:
    """Seconds per byte of a float32 a += b here (the reduction's cost), from the slope
    between 1 MiB and 8 MiB arrays, best of five."""
    times = []
    for n in (1 << 18, 1 << 21):  # float32 elements: 1 MiB and 8 MiB
        a, b = np.ones(n, np.float32), np.ones(n, np.float32)
        best = float("inf")
        for _ in range(5):
            began = time.perf_counter()
            np.add(a, b, out=a)
            best = min(best, time.perf_counter() - began)
        times.append(best)
    return max((times[1] - times[0]) / ((1 << 23) - (1 << 20)), 0.0)


def csv_text(rows: list[dict]) -> str:
    lines = [",".join(PROJECTION_COLUMNS)]
    lines += [",".join(repr(r[c]) if isinstance(r[c], float) else str(r[c])
                       for c in PROJECTION_COLUMNS) for r in rows]
    return "\n".join(lines) + "\n"


def write_projection(out: str, bench_step: dict, comm: dict, batches: dict[str, int],
                     ranks_per_node: int, max_ranks: int) -> tuple[list[str], list[str]]:
    """`mpinn scaling project`: projection.csv, projection.md and (with matplotlib)
    projection.png in out; returns (paths written, the Markdown's lines)."""
    sizes = bench_step["model"]
    n_bytes = calibrate.gradient_bytes(tuple(sizes), bench_step["dtype"])
    rows = project(bench_step, comm, n_bytes, batches, ranks_per_node, max_ranks)
    basis = {"comm": comm, "bench_step_ranks": bench_step["ranks"],
             "ranks_per_host": ranks_per_node, "n_bytes": n_bytes}
    make_directory(out)
    written = [os.path.join(out, "projection.csv"), os.path.join(out, "projection.md")]
    write_atomically(written[0], csv_text(rows).encode())
    image = None
    try:
        image = plot_projection(rows, out)
        written.append(image)
    except UsageError as exc:  # no matplotlib: the tables say it all
        written.append(f"no plot: {exc}")
    model = "-".join(map(str, sizes))
    lines = [f"# Projection: {model} ({bench_step['dtype']}, {bench_step.get('optimizer', 'sgd')})",
             "", *projection_section(rows, basis, image and os.path.basename(image))[2:]]
    write_atomically(written[1], "\n".join(lines).encode())
    return written, lines


def make_directory(path: str) -> None:
    """mkdir -p, or a UsageError saying why not."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {path}: cannot create the directory ({exc.strerror})") from None


def comm_links(path: str) -> tuple[dict, dict[str, dict]]:
    """A bench comm JSON and its transports' fits (exchange, else ping-pong); UsageError
    if it is not one."""
    base = read_json(path, "bench comm results")
    transports = base.get("transports") if isinstance(base, dict) else None
    try:
        links = {k: t.get("exchange", t) for k, t in transports.items()}
        for f in links.values():
            float(f["alpha_s"]), float(f["beta_s_per_byte"])
    except (AttributeError, KeyError, TypeError, ValueError):
        raise UsageError(f"{path} holds no `mpinn bench comm --json` results (transports "
                         f"with alpha_s and beta_s_per_byte)") from None
    return base, links


def described_network(args) -> dict:
    """The comm dict of `mpinn scaling project` from --comm and the flags (UsageError if
    the network is not described)."""
    base, found = comm_links(args.comm) if args.comm else ({}, {})
    net = found.get("net")
    alpha = args.alpha if args.alpha is not None else net and net["alpha_s"]
    beta = args.beta if args.beta is not None else net and net["beta_s_per_byte"]
    if alpha is None or beta is None or alpha < 0 or beta <= 0:
        raise UsageError("describe the network: --alpha SECONDS and --beta SECONDS_PER_BYTE "
                         "(alpha >= 0, beta > 0), or --comm with a bench comm across hosts")
    shm = found.get("shm")
    shm_link = (args.shm_alpha if args.shm_alpha is not None else shm and shm["alpha_s"],
                args.shm_beta if args.shm_beta is not None else shm and shm["beta_s_per_byte"])
    gamma = args.gamma if args.gamma is not None else base.get("gamma_s_per_byte")
    return described_comm(alpha, beta, serial_gamma() if gamma is None else gamma,
                          shm_link if None not in shm_link else None)


def run_project(args) -> int:
    """`mpinn scaling project`: validate, get a bench step (given, or run here on one
    rank), project, write and print."""
    if args.ranks_per_node < 1 or args.global_batch < 1 or args.max_ranks < 1:
        raise UsageError("--ranks-per-node, --global-batch and --max-ranks must be >= 1")
    comm = described_network(args)
    if args.bench_step:
        bench_step = read_json(args.bench_step, "bench step results")
        if "model" not in bench_step or "step_time_s" not in bench_step:
            raise UsageError(f"{args.bench_step} holds no `mpinn bench step --json` results")
    else:
        bench_step = bench_here(args)
    modes = ("strong", "weak") if args.mode == "both" else (args.mode,)
    written, lines = write_projection(args.out, bench_step, comm,
                                      {m: args.global_batch for m in modes},
                                      args.ranks_per_node, args.max_ranks)
    print("\n".join(lines))
    for path in written:
        print(f"wrote {path}" if os.path.exists(path) else f"mpinn scaling: {path}")
    return EXIT_OK


def bench_here(args) -> dict:
    """`mpinn bench step` on one rank of this machine, through the default launcher, for
    the model the flags describe; its JSON goes to OUT/bench-step.json."""
    hidden = parse_hidden(args.hidden)
    if args.features < 1 or args.classes < 2:
        raise UsageError("--features must be >= 1 and --classes >= 2")
    make_directory(args.out)
    path = os.path.join(args.out, "bench-step.json")
    batch = args.global_batch
    rows = sorted({r for r in (1, 4, 16, 64, 256, batch) if r <= batch})
    if len(rows) < 2:
        rows = [1, 2]
    argv = [*launcher_argv(default_launcher(), 1), sys.executable, "-m", "mpinn", "bench",
            "step", "--features", str(args.features), "--hidden", ",".join(map(str, hidden)),
            "--classes", str(args.classes), "--dtype", args.dtype, "--optimizer",
            args.optimizer, "--batch-size", str(batch), "--steps", "20",
            "--local-batches", ",".join(map(str, rows)), "--json", path]
    status, _ = launch(argv, child_environment(os.environ, True), path[:-5] + ".log")
    if status != EXIT_OK:
        raise UsageError(f"the bench step on this machine failed (exit {status}; its log: "
                         f"{path[:-5]}.log); give --bench-step FILE instead")
    return read_json(path, "bench step results")
