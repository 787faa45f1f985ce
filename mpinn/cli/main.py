"""Command line: `mpinn data|train|evaluate|bench|scaling|predict|plot` (and
`python -m mpinn`).

    mpinn data synth data.h5 --samples 100000 --features 64 --classes 10
    mpiexec -n 4 mpinn train data.h5 --out runs/a --hidden 256,128 --epochs 5
    mpiexec -n 2 mpinn evaluate runs/a/checkpoint.h5 data.h5 --json scores.json
    mpinn plot runs/a                       # runs/a/metrics.png (needs mpinn[plot])
    mpinn scaling run data.h5 --out study --ranks 1,2,4   # launches mpiexec itself
    mpinn scaling report study --out study/report

Exit codes (base/errors.py): 0 success; 2 bad usage or bad input (one message, from
rank 0); 1 a failure while running (all ranks end; none is left waiting); 3 stopped by
SIGINT (Ctrl-C), SIGTERM or SIGUSR1 at a step boundary after writing a checkpoint.
The parallel commands (PARALLEL) start MPI; the others are serial and do not: under
mpiexec, rank 0 runs them once.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from mpinn.base.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_USAGE,
    StorageError,
    UsageError,
)
from mpinn.cli.commands import MPINN, build_parser
from mpinn.cli.parser import BadArguments, Command, rank_hint
from mpinn.comm import console, exits, preflight, world
from mpinn.comm.world import Comm
from mpinn.data import datasets
from mpinn.data.importer import run_import
from mpinn.data.importplan import IMPORT_FLAGS, ImportSpec
from mpinn.data.readers import resolve_io
from mpinn.perf import scaling, sweep
from mpinn.perf.bench import bench_step, local_batches
from mpinn.perf.benchcomm import bench_comm, message_sizes
from mpinn.perf.benchio import bench_io
from mpinn.perf.benchsampler import bench_sampler
from mpinn.perf.plot import plot_run
from mpinn.perf.projection import run_project
from mpinn.perf.report import build
from mpinn.perf.timeline import plot_trace
from mpinn.run import checkpoint
from mpinn.run.config import SWEEP_KEYS, keys
from mpinn.run.resolve import load_toml, parse_hidden, resolve
from mpinn.run.rundir import CONFIG, holds_run
from mpinn.train.export import export
from mpinn.train.loop import train
from mpinn.train.predict import predict, run_evaluate


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse(argv)
    except BadArguments as exc:
        # Every rank parsed the same argv and failed alike: only rank 0 speaks,
        # usage and message in one write so that ranks' output cannot interleave.
        if rank_hint() == 0:
            sys.stderr.write(f"{exc.usage}mpinn: error: {exc}\n")
            sys.stderr.flush()
        return EXIT_USAGE
    command = chosen(args)
    if command in PARALLEL:
        comm = world.start()
        return exits.run_or_abort(comm, lambda: run_parallel(PARALLEL[command], args, comm))
    if rank_hint() != 0:
        # A serial command under mpiexec: rank 0 does it once, the others leave
        # quietly (exit 0, so the launcher's exit code is rank 0's).
        return EXIT_OK
    try:
        return SERIAL[command](args)
    except BrokenPipeError:  # `mpinn data inspect F | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (nor at exit)
        return EXIT_OK
    except KeyboardInterrupt:  # one line, no traceback (a file being written is removed)
        print("mpinn: interrupted (SIGINT)", file=sys.stderr)
        return EXIT_SIGINT
    except UsageError as exc:
        print(f"mpinn: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StorageError as exc:
        print(f"mpinn: failed: {exc}", file=sys.stderr)
        return EXIT_FAILED


def chosen(args: argparse.Namespace, command: Command = MPINN) -> tuple[str, ...]:
    """The command args name, as a path: ('train',), ('data', 'synth')."""
    name = getattr(args, command.dest)
    child = next(c for c in command.commands if c.name == name)
    return (name, *chosen(args, child)) if child.commands else (name,)


def run_parallel(command: Callable[[argparse.Namespace, Comm], None],
                 args: argparse.Namespace, comm: Comm) -> int:
    preflight.check(comm)  # a lone copy of a larger job; more threads than cores
    command(args, comm)
    return EXIT_OK


# -- the parallel commands -----------------------------------------------------------------

def synth(args: argparse.Namespace, comm: Comm) -> None:
    """`data synth`: every rank writes its share of the blocks."""
    io = resolve_io(args.io)
    datasets.write_synth(args.out, args.samples, args.features, args.classes,
                         args.test_samples, args.seed, args.regression, comm, io)
    if comm.rank == 0:
        print(datasets.inspect(args.out))
    console.print0(comm, f"written by {comm.size} rank{'s' if comm.size > 1 else ''}"
                   + (f" ({io})" if comm.size > 1 else ""))


def import_command(args: argparse.Namespace, comm: Comm) -> None:
    """`data import`: CSV by rank 0, arrays by every rank (data/importer.py)."""
    spec = ImportSpec(**{f: getattr(args, f) for f in IMPORT_FLAGS}, io=resolve_io(args.io))
    line = run_import(comm, spec)
    if comm.rank == 0:
        print(datasets.inspect(spec.out))
    console.print0(comm, line)


def train_command(args: argparse.Namespace, comm: Comm) -> None:
    toml = {}
    if args.resume and args.out:  # the run's own configuration first
        if not args.overwrite and not holds_run(args.out):  # (both: resolve says which)
            raise UsageError(no_run_to_resume(args.out))
        saved = os.path.join(args.out, CONFIG)
        toml = load_toml(saved) if os.path.exists(saved) else {}
    if args.config:
        toml.update(load_toml(args.config))
    cfg = resolve(toml, {k: getattr(args, k) for k in keys()})
    if cfg.resume and not cfg.overwrite and not holds_run(cfg.out):  # --out from a file
        raise UsageError(no_run_to_resume(cfg.out))
    train(cfg, comm)


def no_run_to_resume(out: str) -> str:
    return (f"--resume: {out} holds no run to resume (no {CONFIG}, no checkpoint): start "
            f"one without --resume")


def evaluate_command(args: argparse.Namespace, comm: Comm) -> None:
    run_evaluate(comm, args.checkpoint, args.data, args.split, args.io, args.json)


def checked_bench(args: argparse.Namespace) -> None:
    if args.batch_size < 1 or args.steps < 1:
        raise UsageError("--batch-size and --steps must be positive")


def bench_io_command(args: argparse.Namespace, comm: Comm) -> None:
    checked_bench(args)
    bench_io(comm, args.data, args.batch_size, args.steps, parse_hidden(args.hidden),
             args.seed, args.json)


def bench_step_command(args: argparse.Namespace, comm: Comm) -> None:
    checked_bench(args)
    if args.features < 1 or args.classes < 2:
        raise UsageError("--features must be >= 1 and --classes >= 2")
    if not args.bucket_mb > 0:
        raise UsageError(f"--bucket-mb must be positive, got {args.bucket_mb:g}")
    if args.reproducible and args.sync_dtype != "model":
        raise UsageError(f"--reproducible sums exactly in float64: not with --sync-dtype "
                         f"{args.sync_dtype}")
    bench_step(comm, args.features, parse_hidden(args.hidden), args.classes,
               args.batch_size, args.steps, args.dtype, args.json,
               local_batches(args.local_batches) if args.local_batches else None,
               args.optimizer, args.sync, args.bucket_mb, args.sync_dtype,
               args.shard_optimizer, args.reproducible)


def bench_sampler_command(args: argparse.Namespace, comm: Comm) -> None:
    checked_bench(args)
    if args.rows < 1 or not 0 <= args.val_fraction < 1:
        raise UsageError("--rows must be >= 1 and --val-fraction in [0, 1)")
    if args.val_fraction and args.shuffle == "block":
        raise UsageError("--val-fraction cannot be used with --shuffle block (as in training)")
    bench_sampler(comm, args.rows, args.shuffle, args.batch_size, args.steps,
                  args.val_fraction, args.json)


def bench_comm_command(args: argparse.Namespace, comm: Comm) -> None:
    sizes = message_sizes(args.sizes, args.max_bytes, args.repeats, args.budget)
    bench_comm(comm, sizes, args.budget, args.repeats, args.json)


PARALLEL: dict[tuple[str, ...], Callable[[argparse.Namespace, Comm], None]] = {
    ("data", "synth"): synth, ("data", "import"): import_command, ("train",): train_command,
    ("evaluate",): evaluate_command,
    ("bench", "io"): bench_io_command, ("bench", "step"): bench_step_command,
    ("bench", "comm"): bench_comm_command, ("bench", "sampler"): bench_sampler_command}


# -- the serial commands -------------------------------------------------------------------

def idx(args: argparse.Namespace) -> int:
    datasets.write_idx(args.out, args.source)
    print(datasets.inspect(args.out))
    return EXIT_OK


def digits(args: argparse.Namespace) -> int:
    datasets.write_digits(args.out, seed=args.seed)
    print(datasets.inspect(args.out))
    return EXIT_OK


def inspect(args: argparse.Namespace) -> int:
    if checkpoint.is_checkpoint(args.file):
        print(checkpoint.describe(args.file))
        return EXIT_OK
    print(datasets.inspect(args.file))
    if args.check:
        print(datasets.check_values(args.file, max_abs=args.max_abs))
    return EXIT_OK


def predict_command(args: argparse.Namespace) -> int:
    n, names, model = predict(args.checkpoint, args.input, args.out, args.dataset)
    print(f"wrote {n} predictions of {model} to {args.out}" + (
        "; classes: " + ", ".join(f"{k} {name}" for k, name in enumerate(names))
        if names else ""))
    return EXIT_OK


def export_command(args: argparse.Namespace) -> int:
    print(export(args.checkpoint, args.out, args.format, args.data))
    return EXIT_OK


def plot(args: argparse.Namespace) -> int:
    if (args.run_dir is None) == (args.trace is None):
        raise UsageError("give a run directory, or --trace TRACE.json (one of them)")
    if args.trace is not None:
        if args.steps < 1:
            raise UsageError(f"--steps must be >= 1, got {args.steps}")
        out = args.out or os.path.splitext(args.trace)[0] + ".png"
        print(f"wrote {plot_trace(args.trace, out, args.steps)}")
        return EXIT_OK
    print(f"wrote {plot_run(args.run_dir, args.out)}")
    return EXIT_OK


def scaling_run(args: argparse.Namespace) -> int:
    """`mpinn scaling run`: serial; the sweep launches its own MPI jobs."""
    toml = load_toml(args.config) if args.config else {}
    study = scaling.define(toml, {k: getattr(args, k) for k in SWEEP_KEYS},
                           ranks=args.ranks, mode=args.mode, repeats=args.repeats,
                           launcher=args.launcher, oversubscribe=args.oversubscribe,
                           out=args.out, calibrated=args.calibrate)
    return sweep.run(study, args.overwrite)


def scaling_report(args: argparse.Namespace) -> int:
    for path in build(args.sweeps, args.out):
        print(f"wrote {path}" if os.path.exists(path) else f"mpinn scaling: {path}")
    return EXIT_OK


SERIAL: dict[tuple[str, ...], Callable[[argparse.Namespace], int]] = {
    ("data", "idx"): idx, ("data", "digits"): digits, ("data", "inspect"): inspect,
    ("predict",): predict_command, ("export",): export_command, ("plot",): plot,
    ("scaling", "run"): scaling_run,
    ("scaling", "report"): scaling_report, ("scaling", "project"): run_project}
