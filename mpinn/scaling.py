"""Scaling studies: one training per (mode, rank count, repeat), launched one after
another, each into a run directory of its own under one sweep directory.

    mpinn scaling run data.h5 --out study --ranks 1,2,4 --mode both --repeats 3
    mpinn scaling run data.h5 --out study --launcher '$LAB/mpiexec -n {n} -ppn 1'
    mpinn scaling run data.h5 --out study --launcher 'srun --ntasks={n}'   # in a job

Layout: SWEEP_DIR/sweep.json (the manifest: what was asked, and each point's state),
SWEEP_DIR/train.toml (the training configuration every point shares) and
SWEEP_DIR/<mode>/p<ranks>-r<repeat>/ (an ordinary run directory) with its log beside
it, p<ranks>-r<repeat>.log. Strong scaling keeps the global batch (--batch-size);
weak scaling keeps the batch per rank (global batch = ranks x --batch-size) and
scales the learning rate linearly with it (--lr-scaling linear --base-batch
--batch-size) unless the options or the --config file choose a rule. At one rank the
two modes train the same configuration.

The driver never starts MPI: it is a serial process that runs the launcher once per
point, with the variables that tie a process to a running MPI job (PMI_*, PMIX_*,
OMPI_* except Open MPI's OMPI_MCA_* settings and OMPI_ALLOW_RUN_AS_ROOT*) removed
from the environment, so that a driver started under mpiexec or srun launches fresh
jobs. A point that would put more ranks x BLAS threads on a machine than it has
cores runs only with --oversubscribe: with the default launcher the driver checks
this machine's cores before anything runs; with any launcher the ranks themselves
count (MPINN_OVERSUBSCRIBE=error makes `mpinn train` refuse, exit 2), and a point
run oversubscribed says so in its summary.json.

Running the same command again continues a sweep: points with a summary.json are
kept, the others run (from scratch); more rank counts or repeats extend it. A sweep
with other settings in the same directory is refused unless --overwrite.
Ctrl-C, SIGTERM or SIGUSR1 reach the running point (which checkpoints and stops,
exit 3) and end the sweep with its status.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

from . import __version__, calibrate, probe
from .config import TrainConfig, resolve, to_toml
from .cpus import blas_threads, usable_cpus
from .data import describe, label_range
from .errors import UsageError
from .fileio import read_bytes, strict_json, write_atomically
from .lock import RunLock
from .sampler import steps_per_epoch
from .schedule import scaled_rate

MODES = ("strong", "weak")
MANIFEST = "sweep.json"
TRAIN_TOML = "train.toml"
# variables a launcher gives its processes: a child must not believe it is one of them
LAUNCH_PREFIXES = ("PMI_", "PMIX_", "OMPI_")
KEPT_PREFIXES = ("OMPI_MCA_", "OMPI_ALLOW_RUN_AS_ROOT")  # settings, not launch state
# ... except the MCA variables mpirun itself sets for the processes of one job
JOB_STATE_PREFIXES = ("OMPI_MCA_ess", "OMPI_MCA_orte_", "OMPI_MCA_pmix", "OMPI_MCA_prte",
                      "OMPI_MCA_initial_wdir")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
FEW_STEPS = 20  # fewer steps per point give noisy figures: said, not refused
# what must match for a second `scaling run` to continue a sweep (ranks and repeats
# may grow)
SAME_SWEEP = ("dataset", "launcher", "oversubscribe", "train_config")


@dataclass(frozen=True)
class Point:
    """One training of a study."""

    mode: str
    ranks: int
    repeat: int
    batch_size: int  # global
    lr_scaling: str
    base_batch: int
    lr: float  # the rate the run starts from (before warmup and schedule)

    @property
    def name(self) -> str:
        return f"{self.mode}/p{self.ranks}-r{self.repeat}"


def parse_ranks(text: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4): distinct positive rank counts, ascending."""
    try:
        ranks = sorted({int(item) for item in text.split(",")})
    except ValueError:
        raise UsageError(f"--ranks: expected rank counts like 1,2,4, got {text!r}") from None
    if not ranks or ranks[0] < 1:
        raise UsageError(f"--ranks: rank counts must be >= 1, got {text!r}")
    return tuple(ranks)


def default_ranks(cpus: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to the cores, and the cores themselves."""
    ranks, p = [], 1
    while p < cpus:
        ranks.append(p)
        p *= 2
    return (*ranks, cpus)


def default_launcher() -> str:
    """The mpiexec beside this Python (the venv's MPI), else the first on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")
    if not found:
        raise UsageError("no mpiexec beside this Python or on PATH: give the launcher, e.g. "
                         "--launcher 'srun --ntasks={n}'")
    return f"{shlex.quote(found)} -n {{n}}"


def launcher_argv(template: str, ranks: int) -> list[str]:
    """The launcher's command for `ranks` ranks: environment variables expanded, then
    split like a shell would, `{n}` replaced by the rank count."""
    if "{n}" not in template:
        raise UsageError(f"--launcher {template!r} has no {{n}} for the rank count, e.g. "
                         f"'mpiexec -n {{n}}'")
    try:
        words = shlex.split(os.path.expandvars(template))
    except ValueError as exc:
        raise UsageError(f"--launcher {template!r}: {exc}") from None
    return [w.replace("{n}", str(ranks)) for w in words]


def child_environment(environ: Mapping[str, str], oversubscribe: bool) -> dict[str, str]:
    """The driver's environment without a launcher's per-job variables; oversubscribed
    ranks refuse to train unless the study allows them."""
    env = {k: v for k, v in environ.items()
           if not k.startswith(LAUNCH_PREFIXES)
           or (k.startswith(KEPT_PREFIXES) and not k.startswith(JOB_STATE_PREFIXES))}
    env["MPINN_OVERSUBSCRIBE"] = "warn" if oversubscribe else "error"
    return env


def plan(cfg: TrainConfig, modes: tuple[str, ...], ranks: tuple[int, ...], repeats: int,
         scaling_given: bool) -> list[Point]:
    """Every point of the study, each configuration validated like `mpinn train` would."""
    points = []
    for mode in modes:
        for n in ranks:
            batch = cfg.batch_size * (n if mode == "weak" else 1)
            rule, base = cfg.lr_scaling, cfg.base_batch
            if mode == "weak" and not scaling_given:
                rule, base = "linear", cfg.batch_size
            try:
                replace(cfg, batch_size=batch, lr_scaling=rule, base_batch=base).validate()
            except UsageError as exc:
                raise UsageError(f"{mode} scaling at {n} ranks (global batch {batch}): "
                                 f"{exc}") from None
            lr = scaled_rate(cfg.lr, rule, batch, base)
            points += [Point(mode, n, k, batch, rule, base, lr) for k in range(repeats)]
    return points


def check_cores(points: list[Point], cpus: int, threads: int) -> None:
    """UsageError if a point puts more ranks x threads on this machine than it has CPUs."""
    crowded = sorted({p.ranks for p in points if p.ranks * threads > cpus})
    if crowded:
        raise UsageError(
            f"{', '.join(map(str, crowded))} ranks x {threads} BLAS thread"
            f"{'s' if threads > 1 else ''} are more than the {cpus} CPUs this machine gives "
            f"this process: such points would measure ranks taking turns on cores, not "
            f"scaling. Leave them out of --ranks, launch on more hosts (--launcher), or pass "
            f"--oversubscribe to run them anyway (they are flagged as oversubscribed)")


@dataclass
class Sweep:
    """A study: where it goes, what it runs, how it launches."""

    out: str
    cfg: TrainConfig  # the shared configuration; batch and lr rule vary per point
    points: list[Point]
    launcher: str  # template with {n}
    oversubscribe: bool
    calibrate: bool = True  # benchmarks for the cost model first (calibrate.py)

    def manifest(self, dataset: dict, states: dict[str, dict]) -> dict:
        modes = sorted({p.mode for p in self.points}, key=MODES.index)
        return {
            "mpinn_version": __version__, "kind": "mpinn scaling sweep",
            "mode": modes[0] if len(modes) == 1 else "both", "modes": modes,
            "ranks": sorted({p.ranks for p in self.points}),
            "repeats": 1 + max(p.repeat for p in self.points),
            "launcher": self.launcher, "oversubscribe": self.oversubscribe,
            "calibrated": self.calibrate,
            "dataset": dataset, "train_config": tomllib.loads(to_toml(replace(self.cfg, out=""))),
            "batch_size": self.cfg.batch_size, "driver_host": socket.gethostname(),
            "updated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "points": [dict(asdict(p), name=p.name, **states.get(p.name, {"state": "pending"}))
                       for p in self.points],
        }


def read_manifest(out: str) -> dict | None:
    path = os.path.join(out, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        manifest = json.loads(read_bytes(path, "sweep manifest"))
    except ValueError:
        raise UsageError(f"{path} is not JSON: not a sweep manifest") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != "mpinn scaling sweep":
        raise UsageError(f"{path} is not an mpinn sweep manifest")
    return manifest


def dataset_entry(path: str) -> dict:
    """The dataset as the manifest and the report describe it (probed first: a corrupt
    file is a message, not a crash of the driver)."""
    probe.check(path)
    info = describe(path)
    outputs = info.outputs or 1 + max(label_range(path, split, 0, info.rows(split))[1]
                                      for split in ("train", "test"))
    return {"path": os.path.abspath(path), "train_rows": info.n_train,
            "test_rows": info.n_test, "features": info.features, "task": info.task,
            "outputs": outputs}


def check_steps(sweep: Sweep, dataset: dict) -> None:
    """UsageError for points whose runs would time no step (the first is a warm-up);
    a word about points with few."""
    rows = dataset["train_rows"] - round(sweep.cfg.val_fraction * dataset["train_rows"])
    steps = {p.name: sweep.cfg.epochs * steps_per_epoch(rows, p.batch_size)
             for p in sweep.points}
    empty = [name for name, n in steps.items() if n < 2]
    if empty:
        raise UsageError(f"{', '.join(empty)}: {min(steps.values())} step(s) in "
                         f"{sweep.cfg.epochs} epoch(s) of {rows} rows, and a run's first "
                         f"step is left out of its timings: give more --epochs or a smaller "
                         f"--batch-size")
    few = min(steps.values())
    if few < FEW_STEPS:
        say(f"some points train {few} steps only: their figures will be noisy (more "
            f"--epochs help)")


def calibration_plan(sweep: Sweep, dataset: dict) -> list[tuple[str, int, list[str]]]:
    """The cost model's benchmarks for this sweep's model and points (calibrate.py)."""
    batches: dict[int, list[int]] = {}
    for p in sweep.points:
        batches.setdefault(p.ranks, []).append(p.batch_size)
    sizes = (dataset["features"], *sweep.cfg.hidden, dataset["outputs"])
    return calibrate.commands(sweep.out, sizes, sweep.cfg.dtype, sweep.cfg.optimizer, batches)


def point_dir(out: str, point: Point) -> str:
    return os.path.join(out, point.name)


def finished(out: str, point: Point) -> bool:
    """Whether the point's run wrote its summary (a run writes it last)."""
    return os.path.exists(os.path.join(point_dir(out, point), "summary.json"))


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
    leftovers = sorted(set(os.listdir(sweep.out)) - {".lock", ".lock.pid"})
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
        status = run_calibration(sweep, dataset, env) if sweep.calibrate else 0
        if status != 0:
            return status
        refused = []
        for index, point in enumerate(sweep.points, 1):
            if finished(sweep.out, point):
                say(f"[{index}/{len(sweep.points)}] {point.name}: finished before, kept")
                states[point.name] = dict(states.get(point.name, {}), state="done")
                continue
            status, states[point.name] = run_point(sweep, point, toml, env, index)
            save()
            if status == 2:  # refused (oversubscribed, say): the other points may run
                refused.append(point.name)
            elif status != 0:
                return stopped(sweep, point, status)
        return finish(sweep, refused)
    finally:
        lock.release()


def run_calibration(sweep: Sweep, dataset: dict, env: dict[str, str]) -> int:
    """The cost model's benchmarks; 0, or the status that ends the sweep."""
    def bench(args: list[str], ranks: int, log: str) -> int:
        status, signalled = launch([*launcher_argv(sweep.launcher, ranks), *args], env, log)
        return 3 if signalled else status
    status = calibrate.calibrate(sweep.out, calibration_plan(sweep, dataset), bench, say)
    if status != 0:
        what = "was stopped" if status == 3 else "failed"
        say(f"the calibration {what} (exit {status}; its logs are in "
            f"{os.path.join(sweep.out, calibrate.DIRECTORY)}); no point ran"
            + ("" if status == 3 else ". --no-calibrate runs the points without it (no "
               "predictions then)"))
    return status if status in (0, 1, 3) else 1


def finish(sweep: Sweep, refused: list[str]) -> int:
    """The last word of a sweep that ran through its points; its exit status."""
    if refused:
        say(f"{len(refused)} point(s) refused to run (exit 2; see their logs): "
            f"{', '.join(refused)}; the others are in {sweep.out}")
        return 2
    say(f"{len(sweep.points)} points in {sweep.out}; the report: mpinn scaling report "
        f"{sweep.out} --out {os.path.join(sweep.out, 'report')}")
    return 0


def run_point(sweep: Sweep, point: Point, toml: str, env: dict[str, str], index: int
              ) -> tuple[int, dict]:
    """Launch one training; returns its exit status and its state for the manifest."""
    out = point_dir(sweep.out, point)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    argv = [*launcher_argv(sweep.launcher, point.ranks), sys.executable, "-m", "mpinn",
            "train", "--config", toml, "--out", out, "--batch-size", str(point.batch_size),
            "--lr-scaling", point.lr_scaling, "--base-batch", str(point.base_batch),
            "--overwrite"]
    say(f"[{index}/{len(sweep.points)}] {point.name}: {point.ranks} rank"
        f"{'s' if point.ranks > 1 else ''}, global batch {point.batch_size}, lr {point.lr:g}")
    log = out + ".log"
    started = datetime.datetime.now()
    status, signalled = launch(argv, env, log)
    seconds = (datetime.datetime.now() - started).total_seconds()
    if status == 0 and not signalled and not finished(sweep.out, point):
        say(f"{point.name}: the launcher ended with exit 0 but the run wrote no summary.json")
        status = 1
    status = 3 if signalled else status  # srun may report its own status for a signal
    state = {0: "done", 2: "refused", 3: "stopped"}.get(status, "failed")
    entry = {"state": state, "exit_code": status, "seconds": round(seconds, 3),
             "log": os.path.relpath(log, sweep.out), "command": shlex.join(argv)}
    if state == "done":  # as the ranks counted it
        summary = json.loads(read_bytes(os.path.join(out, "summary.json"), "run summary"))
        entry["oversubscribed"] = bool(summary.get("oversubscribed"))
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
    if status == 3:
        say(f"stopped at {point.name} (its ranks checkpointed); finished points are kept: "
            f"run the same command again to continue")
    else:
        say(f"{point.name} failed (exit {status}; its log: {log}); the sweep stops here, "
            f"finished points are kept")
    return status if status in (1, 2, 3) else 1


def say(text: str) -> None:
    print(f"mpinn scaling: {text}", flush=True)


def threads_per_rank(environ: Mapping[str, str]) -> int:
    """The BLAS threads each rank will start (what the cores check counts)."""
    return blas_threads(environ, usable_cpus())


def define(toml: dict, flags: dict, *, ranks: str | None, mode: str, repeats: int,
           launcher: str | None, oversubscribe: bool, out: str, calibrated: bool = True
           ) -> Sweep:
    """The sweep the command line asks for, validated before anything runs."""
    if repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {repeats}")
    if flags.get("epochs") is None and "epochs" not in toml:
        flags = dict(flags, epochs=1)
    cfg = resolve(toml, dict(flags, out=out))  # each point has a directory under out
    scaling_given = flags.get("lr_scaling") is not None or "lr_scaling" in toml
    cpus, threads = usable_cpus(), threads_per_rank(os.environ)
    counts = parse_ranks(ranks) if ranks else default_ranks(max(1, cpus // threads))
    modes = MODES if mode == "both" else (mode,)
    points = plan(cfg, modes, counts, repeats, scaling_given)
    template = launcher if launcher is not None else default_launcher()
    for n in counts:  # the template must make sense before the first point runs
        launcher_argv(template, n)
    if launcher is None and not oversubscribe:
        check_cores(points, cpus, threads)
    return Sweep(out=out, cfg=cfg, points=points, launcher=template,
                 oversubscribe=oversubscribe, calibrate=calibrated)
