"""The scaling report: from the run directories of one or more sweeps (scaling.py) to
points.csv, report.md and plots. Serial, no MPI.

    mpinn scaling report study --out study/report
    mpinn scaling report local-study cluster-study --out report   # several sweeps

Every figure comes from the runs' summary.json files (reduced over ranks by the runs
themselves) and is then averaged over the repeats of a point, a point being a (mode,
rank count). Per point: samples/s (mean, min and max over repeats), seconds per step
(`step_s`: the wall time of a step, mean over ranks and repeats) and per phase
(`data_s` ... `update_s`), and `imbalance_s`: the mean over the phases of the slowest
rank's time minus the mean rank's. With X(P) the samples/s at P ranks and P0 the
fewest ranks measured (normally 1):

    speedup     S(P) = P0 X(P) / X(P0)     (strong: the same work faster; weak: the
                                            scaled speedup, P T(P0) / T(P) with T the
                                            time per step)
    efficiency  E(P) = S(P) / P
    Karp-Flatt  e(P) = (1/S - 1/P) / (1 - 1/P)   (strong, P > 1, P0 = 1 only: the
                                            experimentally determined serial fraction)

report.md opens with what makes its figures less firm than they look (caveats.py): a
point run once, runs that timed few steps, predictions off by more than 15%, a
projection without a measured network; `mpinn scaling report` prints the same.
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics

from mpinn.base.errors import UsageError
from mpinn.base.files import read_json, write_atomically
from mpinn.perf.caveats import SHM_ONLY, report_warnings, timed_steps
from mpinn.perf.plot import load_pyplot, plot_scaling
from mpinn.perf.projection import (
    add_predictions,
    load_calibration,
    prediction_section,
    projection_section,
    sweep_projection,
)
from mpinn.perf.scaling import MANIFEST, MODES, read_manifest
from mpinn.perf.study import Run, environment_lines, setup_lines
from mpinn.run.config import COMPARED_KEYS
from mpinn.run.rundir import SUMMARY
from mpinn.train.timing import PHASES

COLUMNS = ("mode", "ranks", "hosts", "ranks_per_host", "repeats", "oversubscribed",
           "global_batch", "samples_per_s", "samples_per_s_min", "samples_per_s_max",
           "step_s", *(f"{p}_s" for p in PHASES), "sync_s", "sync_exposed_s", "imbalance_s",
           "speedup", "efficiency", "karp_flatt", "predicted_step_s", "prediction_error")


# what makes sweeps comparable: the shape of the dataset, and the settings that change
# the work (run.config.COMPARED_KEYS)
DATA_KEYS = ("train_rows", "features", "outputs", "task")


def load_sweeps(sweep_dirs: list[str]) -> tuple[list[dict], list[Run], list[str]]:
    """The manifests, the finished runs, and the points the report leaves out (no
    summary, no steady step timed, or resumed: timings of part of a run)."""
    manifests, runs, missing = [], [], []
    for sweep in dict.fromkeys(sweep_dirs, None):
        if any(os.path.realpath(sweep) == os.path.realpath(m["directory"]) for m in manifests):
            continue  # the same sweep named twice counts once
        manifest = read_manifest(sweep)
        if manifest is None:
            raise UsageError(f"{sweep} holds no {MANIFEST}: not a sweep directory (made by "
                             f"mpinn scaling run or jobs/scaling.sbatch)")
        manifest["directory"] = sweep
        manifests.append(manifest)
        for p in manifest["points"]:
            path = os.path.join(sweep, p["name"])
            summary_path = os.path.join(path, SUMMARY)
            if not os.path.exists(summary_path):
                missing.append(f"{sweep}/{p['name']} ({p.get('state', 'pending')})")
                continue
            summary = read_json(summary_path, "run summary")
            if not isinstance(summary, dict):
                raise UsageError(f"{summary_path} is not a run summary (a JSON object)")
            if not summary.get("samples_per_s"):
                missing.append(f"{sweep}/{p['name']} (no step timed: one step only)")
            elif summary.get("resumed_from_step") is not None:
                missing.append(f"{sweep}/{p['name']} (resumed: timings of part of a run)")
            else:
                runs.append(Run(p["mode"], p["ranks"], p["repeat"], path, summary, sweep))
    check_comparable(manifests)
    if not runs:
        raise UsageError(f"no finished runs in {', '.join(sweep_dirs)}: nothing to report")
    return manifests, runs, missing


def check_comparable(manifests: list[dict]) -> None:
    """UsageError if sweeps that share a mode did different work: another dataset shape,
    model, batch, optimizer or schedule (where the file lies and how a run reports do
    not matter)."""
    for mode in MODES:
        sweeps = [m for m in manifests if mode in m["modes"]]
        for what, keys, source in (("dataset", DATA_KEYS, "dataset"),
                                   ("training", COMPARED_KEYS, "train_config")):
            if len({json.dumps([m[source].get(k) for k in keys]) for m in sweeps}) > 1:
                names = ", ".join(m["directory"] for m in sweeps)
                raise UsageError(f"the {mode} scaling runs of {names} differ in their "
                                 f"{what} ({', '.join(keys)}): report them separately")


def mean(values: list[float]) -> float:
    return statistics.fmean(values)


def point_row(mode: str, ranks: int, runs: list[Run]) -> dict:
    """The CSV row of one point from its repeats (speedup and the rest come later)."""
    batches = {r.summary["batch_size"] for r in runs}
    if len(batches) > 1:
        raise UsageError(f"{mode} scaling at {ranks} ranks: runs with different global batches "
                         f"({', '.join(map(str, sorted(batches)))}) cannot be averaged")
    rates = [r.summary["samples_per_s"] for r in runs]
    zero = {"mean": 0.0, "max": 0.0}  # a phase older runs did not have (allgather)
    phases = [{p: r.summary["step_time_s"].get(p, zero) for p in PHASES} for r in runs]
    row = {"mode": mode, "ranks": ranks,
           "hosts": max(len(r.summary["hosts"]) for r in runs),
           "ranks_per_host": max(max(r.summary["ranks_per_host"]) for r in runs),
           "repeats": len(runs),
           "oversubscribed": any(r.summary.get("oversubscribed") for r in runs),
           "global_batch": batches.pop(), "samples_per_s": mean(rates),
           "samples_per_s_min": min(rates), "samples_per_s_max": max(rates),
           "step_s": mean([step_seconds(r.summary) for r in runs]),
           "steps_timed": min(timed_steps(r.summary) for r in runs)}
    for p in PHASES:
        row[f"{p}_s"] = mean([ph[p]["mean"] for ph in phases])
    # the gradient sync: in flight (overlapping backward; runs before it: the phase) and
    # the part the step waited for after backward (the "allreduce" phase)
    row["sync_s"] = mean([r.summary.get("sync_s", ph["allreduce"])["mean"]
                          for r, ph in zip(runs, phases)])
    row["sync_exposed_s"] = row["allreduce_s"]
    ran = [p for p in PHASES if p != "allgather" or any(ph[p]["max"] > 0 for ph in phases)]
    row["imbalance_s"] = mean([mean([ph[p]["max"] - ph[p]["mean"] for p in ran])
                               for ph in phases])  # (the all-gather's: sharded runs only)
    return row


def step_seconds(summary: dict) -> float:
    """A step's wall time, mean over ranks (older summaries: the sum of the phases)."""
    if summary.get("step_s"):
        return summary["step_s"]["mean"]
    return sum(p["mean"] for p in summary["step_time_s"].values())


def placement(run: Run) -> tuple[int, int]:
    """(hosts, the most ranks on one host) of a run."""
    return len(run.summary["hosts"]), max(run.summary["ranks_per_host"])


def points(runs: list[Run]) -> list[dict]:
    """One row per mode, rank count and placement (one sweep has one placement per rank
    count), with speedup, efficiency and Karp-Flatt per mode."""
    rows = []
    for mode in MODES:
        keys = sorted({(r.ranks, *placement(r)) for r in runs if r.mode == mode})
        group = [point_row(mode, key[0], [r for r in runs if r.mode == mode
                                          and (r.ranks, *placement(r)) == key])
                 for key in keys]
        if group:
            base = group[0]
            for row in group:
                p = row["ranks"]
                speedup = base["ranks"] * row["samples_per_s"] / base["samples_per_s"]
                row["speedup"] = speedup
                row["efficiency"] = speedup / p
                row["karp_flatt"] = ((1 / speedup - 1 / p) / (1 - 1 / p)
                                     if mode == "strong" and p > 1 and base["ranks"] == 1
                                     else None)
        rows += group
    return rows


def csv_text(rows: list[dict], columns: tuple[str, ...] = COLUMNS) -> str:
    """points.csv: numbers as Python writes them (full precision), booleans as
    true/false, missing values empty."""
    def cell(value) -> str:
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        return repr(value) if isinstance(value, float) else str(value)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([cell(row.get(c)) for c in columns])
    return out.getvalue()


def build(sweep_dirs: list[str], out: str) -> list[str]:
    """Write points.csv, report.md and (with matplotlib) the plots into out; returns
    what it wrote, a message in place of the plots if it could not draw them, and the
    report's warnings ('warning: ...', caveats.py), for the console."""
    manifests, runs, missing = load_sweeps(sweep_dirs)
    rows = points(runs)
    calibrations = {m["directory"]: c for m in manifests
                    if (c := load_calibration(m["directory"])) is not None}
    add_predictions(rows, runs, calibrations)
    projected = sweep_projection(rows, runs, calibrations)
    warned = report_warnings(rows, projected[1]["comm"] if projected else None)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create it ({exc.strerror})") from None
    try:
        load_pyplot("the scaling plots")
        label = (SHM_ONLY if projected and "net" not in projected[1]["comm"]["transports"]
                 else None)
        images = plot_scaling(rows, projected[0] if projected else None, out, PHASES, label)
        note = None
    except UsageError as exc:  # no matplotlib: the tables still tell it all
        images, note = [], f"{exc}; points.csv and report.md are written without them"
    write_atomically(os.path.join(out, "points.csv"), csv_text(rows).encode())
    text = markdown(manifests, runs, rows, missing, [os.path.basename(i) for i in images], note,
                    projected, warned)
    write_atomically(os.path.join(out, "report.md"), text.encode())
    written = [os.path.join(out, "points.csv"), os.path.join(out, "report.md"), *images]
    return written + ([note] if note else []) + [f"warning: {t}: {w}" for t, w in warned]


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return ""
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def rate(samples_per_s: float) -> str:
    return f"{samples_per_s:,.0f}" if samples_per_s >= 100 else f"{samples_per_s:.3g}"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}"


def spread(row: dict) -> str:
    """' (min-max)' of samples/s over a point's repeats; nothing for one run."""
    if row["repeats"] < 2:
        return ""
    return f" ({rate(row['samples_per_s_min'])}-{rate(row['samples_per_s_max'])})"


def point_table(rows: list[dict]) -> list[str]:
    """The Markdown table of one mode's points."""
    spread_of = " (min-max)" if any(r["repeats"] > 1 for r in rows) else ""
    lines = [f"| ranks | hosts | ranks/host | global batch | samples/s{spread_of} | speedup "
             "| efficiency | Karp-Flatt | step ms | " + " | ".join(PHASES) + " | imbalance |",
             "|" + "---:|" * (10 + len(PHASES))]
    for r in rows:
        flag = " (oversubscribed)" if r["oversubscribed"] else ""
        lines.append(
            f"| {r['ranks']}{flag} | {r['hosts']} | {r['ranks_per_host']} | {r['global_batch']} "
            f"| {rate(r['samples_per_s'])}{spread(r)} | {fmt(r['speedup'])} | "
            f"{fmt(r['efficiency'])} | "
            f"{fmt(r['karp_flatt'])} | {ms(r['step_s'])} | "
            + " | ".join(ms(r[f"{p}_s"]) for p in PHASES) + f" | {ms(r['imbalance_s'])} |")
    return lines


def run_table(runs: list[Run]) -> list[str]:
    """Every run the report used, with where it lies."""
    lines = ["| mode | ranks | repeat | run directory | hosts | global batch | lr | steps timed "
             "| samples/s | step ms | oversubscribed |", "|---|---:|---:|---|---|---:|---:|---:|"
             "---:|---:|---|"]
    for r in sorted(runs, key=lambda r: (MODES.index(r.mode), r.ranks, r.sweep, r.repeat)):
        s = r.summary
        lines.append(f"| {r.mode} | {r.ranks} | {r.repeat} | `{r.path}` | "
                     f"{', '.join(s['hosts'])} | {s['batch_size']} | {fmt(s.get('lr'), 4)} | "
                     f"{timed_steps(s)} | {rate(s['samples_per_s'])} | "
                     f"{ms(step_seconds(s))} | {'yes' if s.get('oversubscribed') else 'no'} |")
    return lines


def markdown(manifests: list[dict], runs: list[Run], rows: list[dict], missing: list[str],
             images: list[str], note: str | None,
             projected: tuple[list[dict], dict] | None = None,
             warned: list[tuple[str, str]] = ()) -> str:
    """report.md: the set-up, its warnings (caveats.py), a table per mode, the plots,
    every run and the environment."""
    lines = ["# Scaling report", "", *setup_lines(manifests, runs), ""]
    if warned:
        lines += ["## Warnings", "", *(f"- **{title}**: {text}." for title, text in warned), ""]
    for mode in MODES:
        group = [r for r in rows if r["mode"] == mode]
        if not group:
            continue
        batch = (f"global batch {group[0]['global_batch']}" if mode == "strong" else
                 f"{group[0]['global_batch'] // group[0]['ranks']} rows per rank")
        lines += [f"## {mode.capitalize()} scaling ({batch})", "",
                  "samples/s: the mean over repeats (min-max where a point ran more than "
                  "once). Times are milliseconds per step, mean over ranks and repeats; "
                  "imbalance is the mean over phases of the slowest rank's time minus the "
                  "mean's.", "",
                  *point_table(group), ""]
        if group[0]["ranks"] != 1:
            lines += [f"Speedup and efficiency are relative to {group[0]['ranks']} ranks, the "
                      f"fewest measured, taken as ideal; no Karp-Flatt fraction without a "
                      f"1-rank point.", ""]
    if any(r["oversubscribed"] for r in rows):
        lines += ["Points marked (oversubscribed) ran more ranks x BLAS threads than a host "
                  "has cores: they measure ranks taking turns on cores, not scaling.", ""]
    shown = [name for name in images if name not in ("prediction.png", "projection.png")]
    lines += [f"![{name[:-4]}]({name})" for name in shown] + ([""] if shown else [])
    if note:
        lines += [f"No plots: {note}.", ""]
    if any("predicted" in r for r in rows):
        lines += prediction_section(rows, "prediction.png" if "prediction.png" in images
                                    else None)
    if projected:
        lines += projection_section(*projected, "projection.png" if "projection.png" in images
                                    else None)
    lines += ["## Every run", "", *run_table(runs), ""]
    if missing:
        lines += ["Points left out of the tables (not finished, or not timed in full): "
                  + ", ".join(missing) + ".", ""]
    lines += ["## Environment", "", *environment_lines(runs), ""]
    return "\n".join(lines)
