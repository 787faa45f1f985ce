"""Scaling studies, defined: one training per (mode, rank count, repeat), launched one
after another (sweep.py runs them), each into a run directory of its own under one
sweep directory.

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
Ctrl-C, SIGTERM, SIGUSR1 or SIGHUP reach the running point (which checkpoints and
stops, exit 3) and end the sweep with exit 3.
"""

from __future__ import annotations

import datetime
import os
import shlex
import shutil
import socket
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

from mpinn import __version__
from mpinn.base.console import say
from mpinn.base.cpus import blas_threads, usable_cpus
from mpinn.base.errors import UsageError
from mpinn.base.files import read_json
from mpinn.data import probe
from mpinn.data.layout import describe, label_range
from mpinn.data.sampler import steps_per_epoch
from mpinn.nn.schedule import scaled_rate
from mpinn.perf import calibrate
from mpinn.run.config import TrainConfig, settings
from mpinn.run.resolve import resolve, to_toml, tomllib

MODES = ("strong", "weak")
MANIFEST = "sweep.json"
TRAIN_TOML = "train.toml"
# variables a launcher gives its processes: a child must not believe it is one of them
LAUNCH_PREFIXES = ("PMI_", "PMIX_", "OMPI_")
KEPT_PREFIXES = ("OMPI_MCA_", "OMPI_ALLOW_RUN_AS_ROOT")  # settings, not launch state
# ... except the MCA variables mpirun itself sets for the processes of one job
JOB_STATE_PREFIXES = ("OMPI_MCA_ess", "OMPI_MCA_orte_", "OMPI_MCA_pmix", "OMPI_MCA_prte",
                      "OMPI_MCA_initial_wdir")
# fewer timed steps per run (all but the first, a warm-up) give noisy figures: said by
# the driver before and by the report after, not refused
FEW_STEPS = 20
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
            "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "points": [dict(asdict(p), name=p.name, **states.get(p.name, {"state": "pending"}))
                       for p in self.points],
        }


def read_manifest(out: str) -> dict | None:
    path = os.path.join(out, MANIFEST)
    if not os.path.exists(path):
        return None
    manifest = read_json(path, "sweep manifest")
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
    few = min(steps.values()) - 1  # timed: the first step is a warm-up
    if few < FEW_STEPS:
        note(f"some points time {few} steps only (the first of a run is a warm-up), fewer "
            f"than {FEW_STEPS}: their figures will be noisy, and the report will say so "
            f"(more --epochs help)")


def calibration_plan(sweep: Sweep, dataset: dict) -> list[tuple[str, int, list[str]]]:
    """The cost model's benchmarks for this sweep's model and points (calibrate.py)."""
    batches: dict[int, list[int]] = {}
    for p in sweep.points:
        batches.setdefault(p.ranks, []).append(p.batch_size)
    sizes = (dataset["features"], *sweep.cfg.hidden, dataset["outputs"])
    return calibrate.commands(sweep.out, sizes, sweep.cfg.dtype, sweep.cfg.optimizer, batches)


def note(text: str) -> None:
    """A line of the sweep driver's, to its terminal (the points' output passes through)."""
    say(f"mpinn scaling: {text}")


def threads_per_rank(environ: Mapping[str, str]) -> int:
    """The BLAS threads each rank will start (what the cores check counts)."""
    return blas_threads(environ, usable_cpus())


def define(toml: dict, flags: dict, *, ranks: str | None, mode: str, repeats: int,
           launcher: str | None, oversubscribe: bool, out: str, calibrated: bool = True
           ) -> Sweep:
    """The sweep the command line asks for, validated before anything runs."""
    if repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {repeats}")
    flags = dict(flags)
    for f, s in settings():  # a sweep's own defaults (epochs: 1 per point)
        if s.sweep_default is not None and flags.get(f.name) is None and f.name not in toml:
            flags[f.name] = s.sweep_default
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
