"""Command line: `mpinn data|train|evaluate|bench|scaling|predict|plot` (and
`python -m mpinn`).

    mpinn data synth data.h5 --samples 100000 --features 64 --classes 10
    mpiexec -n 4 mpinn train data.h5 --out runs/a --hidden 256,128 --epochs 5
    mpiexec -n 2 mpinn evaluate runs/a/checkpoint.h5 data.h5 --json scores.json
    mpinn plot runs/a                       # runs/a/metrics.png (needs mpinn[plot])
    mpinn scaling run data.h5 --out study --ranks 1,2,4   # launches mpiexec itself
    mpinn scaling report study --out study/report

Exit codes: 0 success; 2 bad usage or bad input (one message, from rank 0);
1 a failure while running (all ranks end; none is left waiting); 3 stopped by
SIGINT (Ctrl-C), SIGTERM or SIGUSR1 at a step boundary after writing a checkpoint.
`data synth` writes in parallel under mpiexec; the other `data` commands,
`scaling`, `predict` and `plot` are serial and do not initialise MPI.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from mpinn import __version__
from mpinn.base.errors import StorageError, UsageError
from mpinn.data.layout import LARGE_INPUT
from mpinn.data.readers import IO_MODES
from mpinn.data.sampler import SHUFFLES
from mpinn.nn.optim import OPTIMIZERS
from mpinn.run.config import closest

EPILOG = """exit codes: 0 success, 2 bad usage or input, 1 failure while running (a
diverged run, a full disk, a rank that died), 3 stopped by Ctrl-C/SIGTERM/SIGUSR1
after writing a checkpoint (continue with --resume).

environment: MPINN_PROBE_TIMEOUT (seconds, default 60) bounds the check of an
HDF5 file's structure, done once per version of a file before any rank opens it;
MPINN_CACHE_DIR (default ~/.cache/mpinn) remembers the files that passed;
MPINN_LOCK=file locks run directories with a lock file instead of flock;
MPINN_MPIO_HINTS="key=value,..." passes MPI-IO hints to --io mpio reads.
Run `mpinn COMMAND --help` for a command's options."""


class BadArguments(UsageError):
    """argparse refused the command line; carries the usage line of the (sub)command."""

    def __init__(self, message: str, usage: str) -> None:
        super().__init__(message)
        self.usage = usage


class Parser(argparse.ArgumentParser):
    """argparse that prints from rank 0 only and raises instead of exiting.

    Under mpiexec every rank parses the same argv: `--help` and `--version` print
    through `_print_message`, so only rank 0 prints; errors raise BadArguments,
    which `main` reports once.
    """

    def _print_message(self, message: str, file=None) -> None:
        if rank_hint() == 0:
            super()._print_message(message, file)

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        raise BadArguments(message, self.format_usage())

    def _check_value(self, action: argparse.Action, value) -> None:
        # argparse's own check, with the closest choice named (mpinn trian -> train)
        if action.choices is not None and value not in action.choices:
            close = closest(str(value), map(str, action.choices))
            hint = (f"did you mean {close}?" if close else
                    "choose from " + ", ".join(map(str, action.choices)))
            raise argparse.ArgumentError(action, f"invalid choice: {value!r} ({hint})")

    def parse(self, argv: Sequence[str] | None) -> argparse.Namespace:
        """parse_args, refusing unknown arguments in the terms of the (sub)command typed."""
        argv = sys.argv[1:] if argv is None else list(argv)
        first = argv[0].split("=")[0] if argv else ""
        if first.startswith("-") and not any(o.startswith(first)
                                              for o in self._option_string_actions):
            # argparse would skip it and take its value for the command: mpinn --hiden 64
            commands = next(a for a in self._actions
                            if isinstance(a, argparse._SubParsersAction)).choices
            self.error(f"unrecognized arguments: {first}; the command comes first: "
                       f"mpinn {{{','.join(commands)}}} [options]")
        args, extras = self.parse_known_args(argv)
        if extras:  # parse_args would report them as the top parser's, without a hint
            self.chosen(args).unrecognized(extras)
        return args

    def chosen(self, args: argparse.Namespace) -> Parser:
        """The (sub)parser of the command args names: `mpinn data inspect` -> its parser."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) \
                    and getattr(args, action.dest, None) in action.choices:
                return action.choices[getattr(args, action.dest)].chosen(args)
        return self

    def unrecognized(self, extras: list[str]) -> NoReturn:
        """Refuse arguments this parser does not know, naming the closest options."""
        options = [s for s in self._option_string_actions if s.startswith("--")]
        hints = [closest(x.split("=")[0], options) for x in extras if x.startswith("-")]
        hints = list(dict.fromkeys(h for h in hints if h))
        message = f"unrecognized arguments: {' '.join(extras)}"
        if hints:
            message += f" (did you mean {' or '.join(hints)}?)"
        self.error(message)


def build_parser() -> Parser:
    p = Parser(prog="mpinn", description="Train multilayer perceptrons data-parallel over MPI, "
               "with input from HDF5 files.", epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"mpinn {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    data = sub.add_parser("data", help="write or inspect dataset files")
    dsub = data.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    s = dsub.add_parser("synth", help="synthetic data labelled by a random teacher network")
    s.add_argument("out", help="HDF5 file to write (replaced atomically)")
    s.add_argument("--samples", type=int, required=True, help="training rows")
    s.add_argument("--features", type=int, default=32, help="input features (default 32)")
    s.add_argument("--classes", type=int, default=10,
                   help="classes, or targets with --regression (default 10)")
    s.add_argument("--test-samples", type=int, help="test rows (default samples/5)")
    s.add_argument("--seed", type=int, default=0, help="content is a function of the seed")
    s.add_argument("--regression", action="store_true",
                   help="write the teacher's float outputs as targets (train with --loss mse)")
    s.add_argument("--io", choices=IO_MODES, default="auto",
                   help="under mpiexec, every rank writes its rows: with collective MPI-IO at "
                   "the rows' offsets (independent), or through parallel HDF5 (mpio); auto: "
                   "mpio if h5py has it")
    x = dsub.add_parser("idx", help="MNIST-format idx files (MNIST, Fashion-MNIST), gzipped "
                        "or not, pixels scaled to [0, 1]")
    x.add_argument("out", help="HDF5 file to write")
    x.add_argument("--from", dest="source", required=True, metavar="DIR",
                   help="directory with train-images, train-labels, t10k-images, t10k-labels")
    d = dsub.add_parser("digits", help="scikit-learn's bundled 8x8 digits (1797 samples)")
    d.add_argument("out", help="HDF5 file to write")
    d.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    i = dsub.add_parser("inspect", help="print layout, sizes, chunking and class balance")
    i.add_argument("file")
    i.add_argument("--check", action="store_true",
                   help="also read every value: finite inputs of sensible size, labels in "
                   "range (exit 2 naming the first bad row if not)")
    i.add_argument("--max-abs", type=float, default=LARGE_INPUT, metavar="F",
                   help=f"with --check: the largest |x| accepted (default {LARGE_INPUT:g})")

    t = sub.add_parser("train", help="train a model (under mpiexec/srun for several ranks)",
                       description="Synchronous data-parallel training: every rank computes "
                       "gradients on its share of each global batch; one Allreduce sums them.",
                       epilog="Flags override the --config TOML file, which overrides the "
                       "defaults shown. The resolved configuration is saved as "
                       "RUN_DIR/config.toml.")
    add_train_options(t)

    e = sub.add_parser("evaluate", help="loss, accuracy, macro precision/recall/F1 and the "
                       "confusion matrix of a checkpoint (distributed)")
    e.add_argument("checkpoint", help="a checkpoint file, or a run directory (its checkpoint.h5)")
    e.add_argument("data")
    e.add_argument("--split", choices=("train", "test"), default="test",
                   help="which split to evaluate (default test)")
    e.add_argument("--io", choices=IO_MODES, default="auto",
                   help="how ranks read the data (see `mpinn train --help`)")
    e.add_argument("--json", metavar="FILE", help="also write the scores (per-class precision, "
                   "recall and F1, the confusion matrix) to this JSON file")

    b = sub.add_parser("bench", help="benchmarks (run under mpiexec)")
    bsub = b.add_subparsers(dest="bench_command", required=True, parser_class=Parser)
    bi = bsub.add_parser("io", help="read throughput of every reader and shuffle mode against "
                         "a raw sequential read, and the data wait of a short training run")
    bi.add_argument("data", help="dataset HDF5 file")
    bi.add_argument("--batch-size", type=int, default=512, help="global batch (default 512)")
    bi.add_argument("--steps", type=int, default=200, help="steps per measurement (default 200)")
    bi.add_argument("--hidden", default="256,128", help="model of the training run")
    bi.add_argument("--seed", type=int, default=0)
    bi.add_argument("--json", help="also write the results to this JSON file")

    bs = bsub.add_parser("step", help="training steps on in-memory data: compute against a "
                         "GEMM's speed, the gradient Allreduce against a bare MPI Allreduce")
    bs.add_argument("--features", type=int, default=784)
    bs.add_argument("--hidden", default="1024,1024")
    bs.add_argument("--classes", type=int, default=10)
    bs.add_argument("--batch-size", type=int, default=512, help="global batch (default 512)")
    bs.add_argument("--steps", type=int, default=50)
    bs.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    bs.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                    help="the update the step times (default sgd)")
    bs.add_argument("--local-batches", metavar="B[,B...]",
                    help="also time forward + backward at these rows per rank (all ranks at "
                    "once) and fit c0 + c1 x rows: the compute term of the cost model, "
                    "written to the JSON as compute_fit (e.g. 64,128,256,512)")
    bs.add_argument("--json", help="also write the results to this JSON file")

    bc = bsub.add_parser(
        "comm", help="latency alpha and inverse bandwidth beta of each transport (shm within "
        "a host, net between hosts) from ping-pongs, and the Allreduce against MPICH's "
        "algorithms in closed form (run under mpiexec/srun with 2 ranks or more)",
        description="Ping-pong one pair of ranks per transport (shm: two ranks on one host; "
        "net: ranks on two hosts) over message sizes 8 B, 32 B, .. (x4) up to --max-bytes, "
        "and fit t = alpha + n * beta (least squares of relative errors; each size's "
        "residual is reported). Then time the float32 SUM Allreduce of all ranks "
        "(MPI_Iallreduce as the gradient sync runs it, and the blocking MPI_Allreduce) and "
        "compare it with the cost model of the algorithm MPICH selects. Each measurement "
        "repeats for about --budget seconds (3 to --repeats times). The table goes to "
        "stdout; --json writes everything (the input of the cost model).")
    bc.add_argument("--sizes", metavar="BYTES[,BYTES...]",
                    help="message sizes in bytes, comma separated (default: 8 B to "
                    "--max-bytes in steps of x4)")
    bc.add_argument("--max-bytes", type=int, default=64 << 20, metavar="BYTES",
                    help="the largest message (default 67108864 = 64 MiB)")
    bc.add_argument("--repeats", type=int, default=1000,
                    help="at most this many repeats per measurement (default 1000)")
    bc.add_argument("--budget", type=float, default=0.2, metavar="SECONDS",
                    help="seconds per measurement, about (default 0.2)")
    bc.add_argument("--json", metavar="FILE", help="also write the results to this JSON file")

    add_scaling_commands(sub)

    r = sub.add_parser("predict", help="write a checkpoint's outputs for input rows (serial)")
    r.add_argument("checkpoint", help="a checkpoint file, or a run directory (its checkpoint.h5)")
    r.add_argument("input", help="HDF5 file with a dataset `x` (or `test/x`) of input rows")
    r.add_argument("out", help="HDF5 file to write: `outputs` (and `predictions`)")
    r.add_argument("--dataset", help="input dataset path inside INPUT (default x, then test/x)")

    pl = sub.add_parser("plot", help="plot a run's loss, accuracy and macro F1 per epoch "
                        "(serial; needs matplotlib: pip install 'mpinn[plot]')")
    pl.add_argument("run_dir", help="a run directory (its metrics.jsonl)")
    pl.add_argument("--out", metavar="FILE.png", help="image to write (default "
                    "RUN_DIR/metrics.png)")
    return p


def add_scaling_commands(sub: argparse._SubParsersAction) -> None:
    """`mpinn scaling run|report|project`: serial drivers, no MPI."""
    sc = sub.add_parser("scaling", help="strong and weak scaling studies: run a sweep of "
                        "trainings, report on it, project it to more ranks (serial; "
                        "launches mpiexec itself)")
    ssub = sc.add_subparsers(dest="scaling_command", required=True, parser_class=Parser)
    sr = ssub.add_parser(
        "run", help="one training per mode, rank count and repeat, each in "
        "SWEEP_DIR/<mode>/p<ranks>-r<repeat>/, with SWEEP_DIR/sweep.json",
        description="Run a scaling study: the trainings one after another, through a "
        "launcher. Strong scaling keeps --batch-size as the global batch; weak scaling keeps "
        "it per rank and scales the learning rate linearly (--lr-scaling linear, --base-batch "
        "= --batch-size) unless --lr-scaling or the --config file chooses. The same command "
        "again continues a stopped sweep (finished points are kept) or extends it with more "
        "--ranks or --repeats. Ctrl-C, SIGTERM and SIGUSR1 reach the running training, which "
        "checkpoints; the sweep then ends with exit 3.",
        epilog="The driver does not start MPI; it removes PMI_*, PMIX_* and OMPI_* variables "
        "(keeping OMPI_MCA_* and OMPI_ALLOW_RUN_AS_ROOT*) from the trainings' environment and "
        "sets MPINN_OVERSUBSCRIBE=error there unless --oversubscribe, so that oversubscribed "
        "ranks refuse to train (exit 2). Then: mpinn scaling report SWEEP_DIR --out DIR.")
    sr.add_argument("--out", required=True, metavar="SWEEP_DIR",
                    help="the sweep directory (created; an unfinished sweep there continues)")
    sr.add_argument("--ranks", metavar="N,N,...", help="rank counts (default 1, 2, 4, ... up "
                    "to the CPUs this process may use, and that count)")
    sr.add_argument("--mode", choices=("strong", "weak", "both"), default="both",
                    help="which study (default both)")
    sr.add_argument("--repeats", type=int, default=1, metavar="K",
                    help="trainings per point, for the spread of the figures (default 1)")
    sr.add_argument("--launcher", metavar="'CMD {n} ...'",
                    help="how to start N ranks, {n} standing for N, $VARIABLES expanded "
                    "(default: the mpiexec beside this Python, `mpiexec -n {n}`); e.g. "
                    "'srun --ntasks={n}' inside an allocation")
    sr.add_argument("--oversubscribe", action="store_true",
                    help="also run points with more ranks x BLAS threads than a host has "
                    "CPUs (flagged as oversubscribed in the runs and the report)")
    sr.add_argument("--overwrite", action="store_true",
                    help="replace a sweep with other settings in SWEEP_DIR")
    sr.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                    help="skip the cost model's benchmarks (bench step at each rank count, "
                    "bench comm at the largest) that run first, through the launcher, into "
                    "SWEEP_DIR/calibration/; the report then has no predictions")
    add_train_options(sr, sweep=True)
    sp = ssub.add_parser(
        "report", help="points.csv, report.md and plots from one or more sweep directories",
        description="Summarise sweeps: one row per mode and rank count (averaged over "
        "repeats) with samples/s, per-phase step times, cross-rank imbalance, speedup, "
        "efficiency and the Karp-Flatt serial fraction; report.md with the tables and the "
        "environment; throughput, efficiency and per-phase plots (with matplotlib: pip "
        "install 'mpinn[plot]').")
    sp.add_argument("sweeps", nargs="+", metavar="SWEEP_DIR")
    sp.add_argument("--out", required=True, metavar="REPORT_DIR", help="where the report goes")
    add_project_command(ssub)


def add_project_command(ssub: argparse._SubParsersAction) -> None:
    """`mpinn scaling project`: the cost model for a network the user describes."""
    pj = ssub.add_parser(
        "project", help="efficiency and samples/s against ranks (to 4096) for a network "
        "given by its latency and bandwidth, strong and weak, with the overlap bound",
        description="Project a model's data-parallel training to many ranks with the cost "
        "model: T(P) = compute(B/P) + update + the Allreduce MPICH runs (recursive doubling "
        "or reduce-scatter + allgather, in two levels: shared memory within a node, the "
        "network between nodes). The compute comes from --bench-step (the JSON of `mpinn "
        "bench step --local-batches ...`, best measured with the ranks per node you will "
        "run) or, without it, from a bench step run here on one rank.",
        epilog="Example networks (see README): 10 GbE with TCP --alpha 25e-6 --beta 8e-10; "
        "InfiniBand HDR --alpha 1e-6 --beta 4e-11.")
    pj.add_argument("--alpha", type=float, metavar="SECONDS",
                    help="network latency per message (required unless --comm has a network)")
    pj.add_argument("--beta", type=float, metavar="S_PER_BYTE",
                    help="network inverse bandwidth, seconds per byte (1 / bytes per second)")
    pj.add_argument("--comm", metavar="FILE", help="`mpinn bench comm --json` results: the "
                    "shared-memory link, gamma, and the network unless --alpha/--beta")
    pj.add_argument("--shm-alpha", type=float, metavar="SECONDS",
                    help="latency between ranks of a node (default: --comm's, else the network's)")
    pj.add_argument("--shm-beta", type=float, metavar="S_PER_BYTE",
                    help="inverse bandwidth between ranks of a node")
    pj.add_argument("--gamma", type=float, metavar="S_PER_BYTE", help="seconds per byte added "
                    "in the reduction (default: --comm's, else measured here)")
    pj.add_argument("--ranks-per-node", type=int, default=1, metavar="K",
                    help="ranks per node (default 1)")
    pj.add_argument("--bench-step", metavar="FILE",
                    help="`mpinn bench step --local-batches ... --json` results: the model, "
                    "its compute against rows per rank, and the update")
    pj.add_argument("--features", type=int, default=784, help="without --bench-step: the "
                    "model's inputs (default 784)")
    pj.add_argument("--hidden", default="1024,1024", help="without --bench-step (default "
                    "1024,1024)")
    pj.add_argument("--classes", type=int, default=10, help="without --bench-step (default 10)")
    pj.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    pj.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    pj.add_argument("--global-batch", type=int, default=512, metavar="B",
                    help="strong scaling's global batch, weak scaling's batch per rank "
                    "(default 512)")
    pj.add_argument("--mode", choices=("strong", "weak", "both"), default="both")
    pj.add_argument("--max-ranks", type=int, default=4096, metavar="P",
                    help="the largest rank count (default 4096; powers of two up to it)")
    pj.add_argument("--out", required=True, metavar="DIR",
                    help="projection.csv, projection.md, projection.png")


def add_train_options(t: Parser, sweep: bool = False) -> None:
    """The options of `mpinn train`; for a sweep (`mpinn scaling run`) without the run
    directory's (--out, --overwrite, --resume), which the sweep decides per point."""
    t.add_argument("data", nargs="?", help="dataset HDF5 file (or `data` in --config)")
    if not sweep:
        t.add_argument("--out", help="run directory (config.toml, metrics.jsonl, "
                       "summary.json, checkpoint.h5); one run at a time may use it (a second "
                       "is refused)")
    t.add_argument("--config", help="TOML file with any of the options below (names with _)")
    t.add_argument("--hidden", help="hidden layer widths, comma separated (default 256,128)")
    t.add_argument("--activation", help="relu | tanh | sigmoid (default relu)")
    t.add_argument("--loss", help="cross-entropy | mse (default cross-entropy)")
    t.add_argument("--optimizer", help="sgd | momentum | adam (default momentum)")
    t.add_argument("--lr", type=float, help="learning rate (default 0.01)")
    t.add_argument("--momentum", type=float, help="momentum coefficient (default 0.9)")
    t.add_argument("--batch-size", type=int, help=(
        "strong scaling: the GLOBAL batch of every point; weak: the batch PER RANK (the "
        "global batch is ranks x this) (default 128)") if sweep else
        "GLOBAL batch size, split over the ranks (default 128)")
    t.add_argument("--epochs", type=int, help="epochs per point (default 1)" if sweep else
                   "epochs; 0 writes the initial checkpoint (default 10)")
    t.add_argument("--seed", type=int, help="seed of weights and sample order (default 0)")
    t.add_argument("--dtype", help="float32 | float64 (default float32)")
    t.add_argument("--weight-decay", type=float, help="L2 weight decay (default 0)")
    t.add_argument("--shuffle", choices=SHUFFLES,
                   help="global: a new permutation of all rows every epoch (default); "
                   "block: permuted blocks of consecutive rows, shuffled within a window in "
                   "memory (large sequential reads, for files larger than memory; results "
                   "depend on the rank count); none: file order")
    t.add_argument("--no-shuffle", dest="shuffle", action="store_const", const="none",
                   help="the same as --shuffle none: batch k is rows k*B .. k*B+B-1")
    t.add_argument("--block-rows", type=int,
                   help="rows per block with --shuffle block (default 1024)")
    t.add_argument("--window-rows", type=int,
                   help="rows (over all ranks) shuffled together in memory with --shuffle "
                   "block (default 65536)")
    t.add_argument("--io", choices=IO_MODES,
                   help="mpio: collective MPI-IO reads (needs parallel h5py); independent: "
                   "every rank reads with the serial driver; auto (default): mpio if available")
    t.add_argument("--no-prefetch", dest="prefetch", action="store_const", const=False,
                   help="read each batch when needed instead of during the previous step")
    if not sweep:
        t.add_argument("--overwrite", action="store_const", const=True,
                       help="replace a run already in --out")
        t.add_argument("--resume", action="store_const", const=True,
                       help="continue the run in --out from its checkpoint.h5, with its "
                       "config.toml (flags may extend --epochs; changing the model, data, batch "
                       "size, seed or sampling is refused). Any number of ranks.")
    t.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="also checkpoint every N steps (default 0: at the end of each epoch "
                   "only)")
    t.add_argument("--keep-checkpoints", type=int, metavar="K",
                   help="keep the last K checkpoints in RUN_DIR/checkpoints (default 2)")
    t.add_argument("--stall-timeout", type=float, metavar="SECONDS",
                   help="a rank that waits this long in a collective asks every rank whether "
                   "it is alive, reports the ranks that do not answer, and ends the job "
                   "(exit 1); 0 waits forever (default 600)")
    add_toolkit_options(t)


def add_toolkit_options(t: Parser) -> None:
    """The training toolkit's options (regularisation, learning rate, validation)."""
    g = t.add_argument_group("regularisation")
    g.add_argument("--dropout", metavar="P[,P...]",
                   help="inverted dropout after every hidden layer: one drop probability for "
                   "all, or one per hidden layer (default none; off in evaluation)")
    g.add_argument("--l1", type=float, metavar="F", help="L1 penalty (default 0)")
    g.add_argument("--clip-norm", type=float, metavar="F",
                   help="clip the summed gradient to this global L2 norm (default 0: off)")
    g = t.add_argument_group("learning rate")
    g.add_argument("--lr-schedule", help="constant | step | cosine (default constant)")
    g.add_argument("--warmup-steps", type=int, metavar="N",
                   help="rise linearly from 0 to the rate over the first N steps (default 0)")
    g.add_argument("--lr-step-every", type=int, metavar="N",
                   help="with --lr-schedule step: multiply the rate by --lr-gamma every N steps")
    g.add_argument("--lr-gamma", type=float, metavar="F", help="step decay factor (default 0.1)")
    g.add_argument("--lr-min", type=float, metavar="F",
                   help="with --lr-schedule cosine: the rate at the last step (default 0)")
    g.add_argument("--lr-scaling", help="none | linear: lr x batch-size / --base-batch "
                   "(default none)")
    g.add_argument("--base-batch", type=int, metavar="N",
                   help="the batch size --lr was tuned for, with --lr-scaling linear")
    g.add_argument("--accumulate", type=int, metavar="K",
                   help="sum K micro-batches of batch-size/K per update, for batches that do "
                   "not fit in memory (default 1)")
    g = t.add_argument_group("validation and reporting")
    g.add_argument("--val-fraction", type=float, metavar="F",
                   help="hold out this fraction of the training split (chosen by the seed), "
                   "report it every epoch and keep the best model as RUN_DIR/best.h5 "
                   "(default 0)")
    g.add_argument("--early-stopping", type=int, metavar="PATIENCE",
                   help="stop after PATIENCE epochs without a lower validation loss (needs "
                   "--val-fraction; default 0: off)")
    g.add_argument("--progress", help="auto | bar | lines | off: progress within an epoch "
                   "(auto: a live bar at a terminal, else lines; default auto)")
    g.add_argument("--log-every", type=float, metavar="SECONDS",
                   help="seconds between progress lines (default 30)")


SWEEP_FLAGS = ("data", "hidden", "activation", "loss", "optimizer", "lr", "momentum",
               "batch_size", "epochs", "seed", "dtype", "weight_decay", "shuffle", "block_rows",
               "window_rows", "io", "prefetch", "checkpoint_every", "keep_checkpoints",
               "stall_timeout", "dropout", "l1", "clip_norm", "lr_schedule", "warmup_steps",
               "lr_step_every", "lr_gamma", "lr_min", "lr_scaling", "base_batch", "accumulate",
               "val_fraction", "early_stopping", "progress", "log_every")
TRAIN_FLAGS = (*SWEEP_FLAGS, "out", "overwrite", "resume")


PARALLEL = ("train", "evaluate", "bench")  # and `data synth`: they start MPI


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse(argv)
    except BadArguments as exc:
        # Every rank parsed the same argv and failed alike: only rank 0 speaks,
        # usage and message in one write so that ranks' output cannot interleave.
        if rank_hint() == 0:
            sys.stderr.write(f"{exc.usage}mpinn: error: {exc}\n")
            sys.stderr.flush()
        return 2
    if args.command in PARALLEL or getattr(args, "data_command", "") == "synth":
        from mpinn.comm import dist
        return dist.run_or_abort(dist.world(), lambda: run_parallel(args, dist.world()))
    if rank_hint() != 0:
        # A serial command under mpiexec: rank 0 does it once, the others leave
        # quietly (exit 0, so the launcher's exit code is rank 0's).
        return 0
    try:
        return run_serial(args)
    except KeyboardInterrupt:  # one line, no traceback (a file being written is removed)
        print("mpinn: interrupted (SIGINT)", file=sys.stderr)
        return 130
    except UsageError as exc:
        print(f"mpinn: error: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:
        print(f"mpinn: failed: {exc}", file=sys.stderr)
        return 1


def run_parallel(args: argparse.Namespace, comm) -> int:
    from mpinn.comm import preflight
    preflight.check(comm)  # a lone copy of a larger job; more threads than cores
    if args.command == "data":  # synth: every rank writes its share of the blocks
        from mpinn.comm import dist
        from mpinn.data import datasets
        from mpinn.data.readers import resolve_io
        io = resolve_io(args.io)
        datasets.write_synth(args.out, args.samples, args.features, args.classes,
                             args.test_samples, args.seed, args.regression, comm, io)
        if comm.rank == 0:
            print(datasets.inspect(args.out))
        dist.print0(comm, f"written by {comm.size} ranks" + (f" ({io})" if comm.size > 1 else ""))
    elif args.command == "bench" and args.bench_command == "comm":
        from mpinn.perf.benchcomm import bench_comm, message_sizes
        sizes = message_sizes(args.sizes, args.max_bytes, args.repeats, args.budget)
        bench_comm(comm, sizes, args.budget, args.repeats, args.json)
    elif args.command == "bench":
        from mpinn.perf.bench import bench_io, bench_step, local_batches
        from mpinn.run.config import parse_hidden
        if args.batch_size < 1 or args.steps < 1:
            raise UsageError("--batch-size and --steps must be positive")
        if args.bench_command == "io":
            bench_io(comm, args.data, args.batch_size, args.steps, parse_hidden(args.hidden),
                     args.seed, args.json)
        else:
            if args.features < 1 or args.classes < 2:
                raise UsageError("--features must be >= 1 and --classes >= 2")
            bench_step(comm, args.features, parse_hidden(args.hidden), args.classes,
                       args.batch_size, args.steps, args.dtype, args.json,
                       local_batches(args.local_batches) if args.local_batches else None,
                       args.optimizer)
    elif args.command == "train":
        from mpinn.run.config import load_toml, resolve
        from mpinn.train.loop import train
        toml = {}
        if args.resume and args.out:  # the run's own configuration first
            saved = os.path.join(args.out, "config.toml")
            toml = load_toml(saved) if os.path.exists(saved) else {}
        if args.config:
            toml.update(load_toml(args.config))
        cfg = resolve(toml, {k: getattr(args, k) for k in TRAIN_FLAGS})
        train(cfg, comm)
    else:
        from mpinn.train.predict import run_evaluate
        run_evaluate(comm, args.checkpoint, args.data, args.split, args.io, args.json)
    return 0


def run_serial(args: argparse.Namespace) -> int:
    from mpinn.data import datasets
    if args.command == "predict":
        from mpinn.train.predict import predict
        n = predict(args.checkpoint, args.input, args.out, args.dataset)
        print(f"wrote {n} predictions to {args.out}")
    elif args.command == "scaling":
        return run_scaling(args)
    elif args.command == "plot":
        from mpinn.perf.plot import plot_run
        print(f"wrote {plot_run(args.run_dir, args.out)}")
    elif args.data_command == "idx":
        datasets.write_idx(args.out, args.source)
        print(datasets.inspect(args.out))
    elif args.data_command == "digits":
        datasets.write_digits(args.out, seed=args.seed)
        print(datasets.inspect(args.out))
    elif args.data_command == "inspect":
        print(datasets.inspect(args.file))
        if args.check:
            print(datasets.check_values(args.file, max_abs=args.max_abs))
    return 0


def run_scaling(args: argparse.Namespace) -> int:
    """`mpinn scaling run|report|project`: serial; a sweep launches its own MPI jobs."""
    if args.scaling_command == "project":
        from mpinn.perf.projection import run_project
        return run_project(args)
    if args.scaling_command == "report":
        from mpinn.perf.report import build
        for path in build(args.sweeps, args.out):
            print(f"wrote {path}" if os.path.exists(path) else f"mpinn scaling: {path}")
        return 0
    from mpinn.perf import scaling
    from mpinn.run.config import load_toml
    toml = load_toml(args.config) if args.config else {}
    flags = {k: getattr(args, k) for k in SWEEP_FLAGS}
    sweep = scaling.define(toml, flags, ranks=args.ranks, mode=args.mode,
                           repeats=args.repeats, launcher=args.launcher,
                           oversubscribe=args.oversubscribe, out=args.out,
                           calibrated=args.calibrate)
    from mpinn.perf.sweep import run
    return run(sweep, args.overwrite)


def rank_hint() -> int:
    """This process's rank without initialising MPI (for messages before MPI starts).

    Launchers export it: MPICH/Hydra and Intel MPI PMI_RANK, Open MPI
    OMPI_COMM_WORLD_RANK, PMIx PMIX_RANK; srun sets SLURM_PROCID (0 for every
    rank under mpiexec, hence checked last).
    """
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0
