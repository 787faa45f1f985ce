"""Running a scaling study (scaling.py defines it): the calibration, then the points
one after another, each through the launcher in a session of its own, its output to
the terminal and to its log; the manifest rewritten after each. Serial, no MPI.

A point's state in sweep.json: pending, done, refused (exit 2: the ranks refused to
train, e.g. oversubscribed; the other points run), stopped (exit 3 or a signal: the
sweep ends, and the same command continues it), failed (any other status: the sweep
ends). A point with a summary.json is finished, whatever the manifest says.
"""

from __future__ import annotations

import datetime
import os
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import replace

from mpinn.base.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, UsageError
from mpinn.base.files import read_json, strict_json, write_atomically
from mpinn.perf import calibrate
from mpinn.perf.scaling import (
    MANIFEST,
    MODES,
    SAME_SWEEP,
    TRAIN_TOML,
    Point,
    Sweep,
    calibration_plan,
    check_steps,
    child_environment,
    dataset_entry,
    launcher_argv,
    note,
    read_manifest,
)
from mpinn.run.lock import FLOCK_NAME, PID_NAME, RunLock
from mpinn.run.resolve import to_toml
from mpinn.run.rundir import SUMMARY

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)


def point_dir(out: str, point: Point) -> str:
    return os.path.join(out, point.name)


def finished(out: str, point: Point) -> bool:
    """Whether the point's run wrote its summary (a run writes it last)."""
    return os.path.exists(os.path.join(point_dir(out, point), SUMMARY))


def previous_states(sweep: Sweep, dataset: dict, overwrite: bool) -> dict[str, dict]:
    """The states of a sweep already in sweep.out that this one continues (its points
    join this sweep's); {} for a new sweep. UsageError for a different sweep there."""
    old = read_manifest(sweep.out)
    new = sweep.manifest(dataset, {})
    if old is not None and not overwrite:
        differ = [key for key in SAME_SWEEP if old.get(key) != new[key]]
        if differ:
            raise UsageError(f"{sweep.out} holds a sweep with other settings (its "
                             f"{', '.join(differ)} differ from this one's): use another --out, "
                             f"or --overwrite to replace it")
        known = {p.name for p in sweep.points}
        fields = Point.__dataclass_fields__
        sweep.points += [Point(**{k: v for k, v in p.items() if k in fields})
                         for p in old["points"] if p["name"] not in known]
        sweep.points.sort(key=lambda p: (MODES.index(p.mode), p.ranks, p.repeat))
        return {p["name"]: {k: v for k, v in p.items() if k not in fields and k != "name"}
                for p in old["points"]}
    leftovers = sorted(set(os.listdir(sweep.out)) - {FLOCK_NAME, PID_NAME})
    if old is None and leftovers and not overwrite:
        raise UsageError(f"{sweep.out} is not empty and holds no sweep ({', '.join(leftovers[:3])}"
                         f"{', ...' if len(leftovers) > 3 else ''}): use a new or empty --out")
    for name in (MANIFEST, TRAIN_TOML, calibrate.DIRECTORY, *MODES):  # a sweep's, no more
        path = os.path.join(sweep.out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    return {}


def run(sweep: Sweep, overwrite: bool) -> int:
    """Run the points not yet finished, one after another; returns the exit status."""
    try:
        os.makedirs(sweep.out, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {sweep.out}: cannot create it ({exc.strerror})") from None
    lock = RunLock(sweep.out).acquire()
    try:
        dataset = dataset_entry(sweep.cfg.data)
        check_steps(sweep, dataset)
        states = previous_states(sweep, dataset, overwrite)
        toml = os.path.join(sweep.out, TRAIN_TOML)
        write_atomically(toml, to_toml(replace(sweep.cfg, out="")).encode())
        env = child_environment(os.environ, sweep.oversubscribe)
        def save() -> None:
            write_atomically(os.path.join(sweep.out, MANIFEST),
                             strict_json(sweep.manifest(dataset, states), indent=1).encode())
        save()
        status = run_calibration(sweep, dataset, env) if sweep.calibrate else EXIT_OK
        if status != EXIT_OK:
            return status
        refused = []
        for index, point in enumerate(sweep.points, 1):
            if finished(sweep.out, point):
                note(f"[{index}/{len(sweep.points)}] {point.name}: finished before, kept")
                states[point.name] = dict(states.get(point.name, {}), state="done")
                continue
            status, states[point.name] = run_point(sweep, point, toml, env, index)
            save()
            if status == EXIT_USAGE:  # refused (oversubscribed, say): the other points may run
                refused.append(point.name)
            elif status != EXIT_OK:
                return stopped(sweep, point, status)
        save()  # the points found finished are "done" in the manifest too
        return finish(sweep, refused)
    finally:
        lock.release()


def run_calibration(sweep: Sweep, dataset: dict, env: dict[str, str]) -> int:
    """The cost model's benchmarks; 0, or the status that ends the sweep."""
    def bench(args: list[str], ranks: int, log: str) -> int:
        status, signalled = launch([*launcher_argv(sweep.launcher, ranks), *args], env, log)
        return EXIT_INTERRUPTED if signalled else status
    status = calibrate.calibrate(sweep.out, calibration_plan(sweep, dataset), bench, note)
    if status != EXIT_OK:
        what = "was stopped" if status == EXIT_INTERRUPTED else "failed"
        note(f"the calibration {what} (exit {status}; its logs are in "
            f"{os.path.join(sweep.out, calibrate.DIRECTORY)}); no point ran"
            + ("" if status == EXIT_INTERRUPTED else ". --no-calibrate runs the points "
               "without it (no predictions then)"))
    return status if status in (EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED) else EXIT_FAILED


def finish(sweep: Sweep, refused: list[str]) -> int:
    """The last word of a sweep that ran through its points; its exit status."""
    if refused:
        note(f"{len(refused)} point(s) refused to run (exit 2; see their logs): "
            f"{', '.join(refused)}; the others are in {sweep.out}")
        return EXIT_USAGE
    note(f"{len(sweep.points)} points in {sweep.out}; the report: mpinn scaling report "
        f"{sweep.out} --out {os.path.join(sweep.out, 'report')}")
    return EXIT_OK


def run_point(sweep: Sweep, point: Point, toml: str, env: dict[str, str], index: int
              ) -> tuple[int, dict]:
    """Launch one training; returns its exit status and its state for the manifest."""
    out = point_dir(sweep.out, point)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    argv = [*launcher_argv(sweep.launcher, point.ranks), sys.executable, "-m", "mpinn",
            "train", "--config", toml, "--out", out, "--batch-size", str(point.batch_size),
            "--lr-scaling", point.lr_scaling, "--base-batch", str(point.base_batch),
            "--overwrite"]
    note(f"[{index}/{len(sweep.points)}] {point.name}: {point.ranks} rank"
        f"{'s' if point.ranks > 1 else ''}, global batch {point.batch_size}, lr {point.lr:g}")
    log = out + ".log"
    started = datetime.datetime.now()
    status, signalled = launch(argv, env, log)
    seconds = (datetime.datetime.now() - started).total_seconds()
    if status == EXIT_OK and not signalled and not finished(sweep.out, point):
        note(f"{point.name}: the launcher ended with exit 0 but the run wrote no summary.json")
        status = EXIT_FAILED
    status = EXIT_INTERRUPTED if signalled else status  # srun may report its own status
    state = {EXIT_OK: "done", EXIT_USAGE: "refused", EXIT_INTERRUPTED: "stopped"}.get(
        status, "failed")
    entry = {"state": state, "exit_code": status, "seconds": round(seconds, 3),
             "log": os.path.relpath(log, sweep.out), "command": shlex.join(argv)}
    if state == "done":  # as the ranks counted it
        summary = read_json(os.path.join(out, SUMMARY), "run summary")
        entry["oversubscribed"] = isinstance(summary, dict) and bool(
            summary.get("oversubscribed"))
    return status, entry


def launch(argv: list[str], env: dict[str, str], log_path: str) -> tuple[int, bool]:
    """Run argv in a session of its own, its output to ours and to log_path; SIGINT,
    SIGTERM and SIGUSR1 sent to us are passed on to it. Returns (status, signalled)."""
    received: list[int] = []
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    except OSError as exc:
        raise UsageError(f"cannot start the launcher {argv[0]!r}: {exc.strerror}") from None

    def forward(signum: int, _frame) -> None:
        received.append(signum)
        proc.send_signal(signum)
    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        with open(log_path, "wb") as log:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
                log.write(line)
        status = proc.wait()
    except BaseException:  # the driver cannot go on (a full disk, a closed pipe): nor the job
        proc.terminate()
        proc.wait()
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return (128 - status if status < 0 else status), bool(received)


def stopped(sweep: Sweep, point: Point, status: int) -> int:
    """Say why the sweep ends at `point`; returns the sweep's exit status."""
    log = os.path.relpath(point_dir(sweep.out, point) + ".log")
    if status == EXIT_INTERRUPTED:
        note(f"stopped at {point.name} (its ranks checkpointed); finished points are kept: "
            f"run the same command again to continue")
    else:
        note(f"{point.name} failed (exit {status}; its log: {log}); the sweep stops here, "
            f"finished points are kept")
    return status if status in (EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED) else EXIT_FAILED
