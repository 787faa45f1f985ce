"""The commands of `mpinn`, as tables: each (sub)command's help and arguments are data,
built into one parser by parser.py (`mpinn train` and `mpinn scaling run` take their
training options from TrainConfig: options.py)."""

from __future__ import annotations

import argparse

from mpinn import __version__
from mpinn.cli.parser import Command, Parser, arg
from mpinn.comm.gradsync import SYNC_MODES
from mpinn.comm.wire import WIRE_DTYPES
from mpinn.data.layout import LARGE_INPUT
from mpinn.data.readers import IO_MODES
from mpinn.data.sampler import SHUFFLES
from mpinn.nn.optim import OPTIMIZERS
from mpinn.run.config import TrainConfig
from mpinn.train.export import FORMATS as EXPORT_FORMATS

EPILOG = """exit codes: 0 success, 2 bad usage or input, 1 failure while running (a
diverged run, a full disk, a rank that died), 3 stopped by Ctrl-C/SIGTERM/SIGUSR1
after writing a checkpoint (continue with --resume).

environment: MPINN_PROBE_TIMEOUT (seconds, default 60) bounds the check of an
HDF5 file's structure, done once per version of a file before any rank opens it;
MPINN_CACHE_DIR (default ~/.cache/mpinn) remembers the files that passed;
MPINN_LOCK=file locks run directories with a lock file instead of flock;
MPINN_MPIO_HINTS="key=value,..." passes MPI-IO hints to --io mpio reads.
Run `mpinn COMMAND --help` for a command's options."""

OUT_FILE = "HDF5 file to write"
FROM_CHECKPOINT = "a checkpoint file, or a run directory (its checkpoint.h5)"
JSON = "also write the results to this JSON file"

DATA = Command("data", "write or inspect dataset files", dest="data_command", commands=(
    Command("synth", "synthetic data labelled by a random teacher network", options=(
        arg("out", help="HDF5 file to write (replaced atomically)"),
        arg("--samples", type=int, required=True, help="training rows"),
        arg("--features", type=int, default=32, help="input features (default 32)"),
        arg("--classes", type=int, default=10,
            help="classes, or targets with --regression (default 10)"),
        arg("--test-samples", type=int, help="test rows (default samples/5)"),
        arg("--seed", type=int, default=0, help="content is a function of the seed"),
        arg("--regression", action="store_true",
            help="write the teacher's float outputs as targets (train with --loss mse)"),
        arg("--io", choices=IO_MODES, default="auto",
            help="under mpiexec, every rank writes its rows: with collective MPI-IO at the "
            "rows' offsets (independent), or through parallel HDF5 (mpio); auto: mpio if h5py "
            "has it"))),
    Command(
        "import", "your own data: CSV/TSV, .npy pairs, .npz or HDF5 with any names -> a "
        "dataset file (labels as 0..C-1, an optional stratified test split, standardization)",
        description="Write a dataset file in mpinn's layout from your data. CSV/TSV is read "
        "in two streaming passes by one process (needs pandas: pip install 'mpinn[csv]'); "
        "arrays (.npy, .npz, HDF5) are written by every rank under mpiexec. Class labels of "
        "any kind (strings, 1..C, -1/+1) become 0..C-1 in sorted order, their names kept in "
        "the file. Bad input (ragged rows, a non-numeric cell, NaN or infinity, an unknown "
        "column) stops with exit 2 naming the line or row and the column; nothing is written.",
        epilog="Examples: `mpinn data import data.h5 --from mydata.csv --test-fraction 0.2 "
        "--standardize`; `mpinn data import data.h5 --x X.npy --y Y.npy`; `mpinn data import "
        "data.h5 --from theirs.h5 --x /features --y /labels`; `mpinn data import new.h5 --from "
        "new.csv --like data.h5` (new rows to evaluate or predict).",
        options=(
            arg("out", help="HDF5 file to write (replaced atomically)"),
            arg("--from", dest="source", metavar="SOURCE",
                help="a .csv/.tsv/.tab/.txt table, an .npz archive or an HDF5 file (without "
                "it: --x X.npy --y Y.npy)"),
            arg("--x", metavar="ARRAY", help="the inputs: an .npy file, or an array of SOURCE "
                "(.npz key, HDF5 dataset path; default x)"),
            arg("--y", metavar="ARRAY", help="the labels or targets, as --x (default y)"),
            arg("--test-x", metavar="ARRAY", help="a test split's inputs, as --x"),
            arg("--test-y", metavar="ARRAY", help="a test split's labels, as --y"),
            arg("--label", metavar="COLUMN", help="CSV: the label (or target) column, by name "
                "or index from 0 (negative from the end; default the last)"),
            arg("--columns", metavar="C,C,...", help="CSV: the input columns, by name or "
                "index (default all but the label)"),
            arg("--delimiter", metavar="CHAR", help="CSV: the field separator (default: tab "
                "for .tsv/.tab, else comma)"),
            arg("--header", action="store_true", default=None,
                help="CSV: the first line names the columns (default: detected)"),
            arg("--no-header", dest="header", action="store_false",
                help="CSV: the first line is data"),
            arg("--regression", action="store_true",
                help="store float targets (train with --loss mse), not class labels"),
            arg("--test-fraction", type=float, default=0.0, metavar="F",
                help="hold out this fraction as the test split, seeded and stratified by "
                "class (default 0: every row trains)"),
            arg("--seed", type=int, default=0, help="the seed of the split (default 0)"),
            arg("--standardize", action="store_true",
                help="store inputs as (x - mean) / std with the training rows' statistics, "
                "kept in the file (input_mean, input_std) for --like and export; without "
                "it inputs are stored as they are"),
            arg("--like", metavar="TRAIN.h5", help="new rows prepared as TRAIN.h5's were "
                "(its class names and statistics), written as the test split"),
            arg("--io", choices=IO_MODES, default="auto",
                help="arrays under mpiexec: how ranks write (as `data synth --io`)"))),
    Command("idx", "MNIST-format idx files (MNIST, Fashion-MNIST), gzipped or not, pixels "
            "scaled to [0, 1]", options=(
                arg("out", help=OUT_FILE),
                arg("--from", dest="source", required=True, metavar="DIR",
                    help="directory with train-images, train-labels, t10k-images, "
                    "t10k-labels"))),
    Command("digits", "scikit-learn's bundled 8x8 digits (1797 samples)", options=(
        arg("out", help=OUT_FILE),
        arg("--seed", type=int, default=0, help="seed of the train/test split"))),
    Command("inspect", "print layout, sizes, chunking and class balance", options=(
        arg("file"),
        arg("--check", action="store_true",
            help="also read every value: finite inputs of sensible size, labels in range "
            "(exit 2 naming the first bad row if not)"),
        arg("--max-abs", type=float, default=LARGE_INPUT, metavar="F",
            help=f"with --check: the largest |x| accepted (default {LARGE_INPUT:g})")))))

TRAIN = Command(
    "train", "train a model (under mpiexec/srun for several ranks)",
    description="Synchronous data-parallel training: every rank computes gradients on its "
    "share of each global batch; one Allreduce sums them.",
    epilog="Flags override the --config TOML file, which overrides the defaults shown. The "
    "resolved configuration is saved as RUN_DIR/config.toml.", train_options="train")

EVALUATE = Command(
    "evaluate", "loss, accuracy, macro precision/recall/F1 and the confusion matrix of a "
    "checkpoint (distributed)", options=(
        arg("checkpoint", help="a checkpoint file, or a run directory: its best.h5 (the "
            "epoch of the lowest validation loss, kept with --val-fraction) if it has one, "
            "else its checkpoint.h5; the first line printed names the model scored"),
        arg("data"),
        arg("--split", choices=("train", "test", "val"), default="test",
            help="which split to evaluate: test (default), train, or val: the training rows "
            "the run held out with --val-fraction (the checkpoint holds its seed and fraction)"),
        arg("--io", choices=IO_MODES, default="auto",
            help="how ranks read the data (see `mpinn train --help`)"),
        arg("--json", metavar="FILE", help="also write the scores (per-class precision, "
            "recall and F1, the confusion matrix) to this JSON file")))

BENCH = Command("bench", "benchmarks (run under mpiexec)", dest="bench_command", commands=(
    Command("io", "read throughput of every reader and shuffle mode against a raw sequential "
            "read, and the data wait of a short training run", options=(
                arg("data", help="dataset HDF5 file"),
                arg("--batch-size", type=int, default=512, help="global batch (default 512)"),
                arg("--steps", type=int, default=200,
                    help="steps per measurement (default 200)"),
                arg("--hidden", default="256,128", help="model of the training run"),
                arg("--seed", type=int, default=0,
                    help="seed of the shuffles and the model (default 0)"),
                arg("--json", help=JSON))),
    Command("step", "training steps on in-memory data: compute against a GEMM's speed, the "
            "gradient sync (in flight, and exposed after backward) against a bare MPI "
            "Allreduce, the update, memory per rank", options=(
                arg("--features", type=int, default=784,
                    help="inputs of the model (default 784)"),
                arg("--hidden", default="1024,1024",
                    help="hidden layer widths, comma separated (default 1024,1024)"),
                arg("--classes", type=int, default=10, help="outputs (default 10)"),
                arg("--batch-size", type=int, default=512, help="global batch (default 512)"),
                arg("--steps", type=int, default=50,
                    help="steps timed, after one untimed warm-up step (default 50)"),
                arg("--dtype", choices=("float32", "float64"), default="float32",
                    help="the model's dtype (default float32)"),
                arg("--optimizer", choices=OPTIMIZERS, default="sgd",
                    help="the update the step times (default sgd)"),
                arg("--sync", choices=SYNC_MODES, default=TrainConfig.sync,
                    help=f"the gradient sync, as in training (default {TrainConfig.sync})"),
                arg("--bucket-mb", type=float, default=TrainConfig.bucket_mb, metavar="MB",
                    help="overlap: the least MB per Allreduce, as in training (default "
                    f"{TrainConfig.bucket_mb})"),
                arg("--sync-dtype", choices=("model", *WIRE_DTYPES), default="model",
                    help="the gradients on the wire, as in training; float16/bfloat16 also "
                    "report the bytes sent and the casts' time (default model)"),
                arg("--shard-optimizer", action="store_true",
                    help="as in training: each rank updates 1/P of the parameters; reports "
                    "the update, the all-gather and the optimizer's memory per rank"),
                arg("--reproducible", action="store_true",
                    help="also time --reproducible's steps (products on integer grids in "
                    "float64) on the same rows, each after a normal step, and report them "
                    "against it: per phase, and the time spent putting tensors on grids"),
                arg("--local-batches", metavar="B[,B...]",
                    help="also time forward + backward at these rows per rank (all ranks at "
                    "once) and fit c0 + c1 x rows: the compute term of the cost model, "
                    "written to the JSON as compute_fit (e.g. 64,128,256,512)"),
                arg("--json", help=JSON))),
    Command("sampler", "the sample order's cost on a virtual dataset (no file): the epoch "
            "plan's memory per rank and the time to draw a step's rows", options=(
                arg("--rows", type=int, required=True, metavar="N",
                    help="rows of the virtual training split"),
                arg("--shuffle", choices=SHUFFLES, default="feistel",
                    help="the shuffle mode (default feistel)"),
                arg("--batch-size", type=int, default=512, help="global batch (default 512)"),
                arg("--steps", type=int, default=200,
                    help="steps drawn, spread over the epoch (default 200)"),
                arg("--val-fraction", type=float, default=0.0, metavar="F",
                    help="also hold out this fraction, as training would (default 0)"),
                arg("--json", help=JSON))),
    Command(
        "comm", "latency alpha and inverse bandwidth beta of each transport (shm within a "
        "host, net between hosts) from ping-pongs, and the Allreduce against MPICH's "
        "algorithms in closed form (run under mpiexec/srun with 2 ranks or more)",
        description="Ping-pong one pair of ranks per transport (shm: two ranks on one host; "
        "net: ranks on two hosts) over message sizes 8 B, 32 B, .. (x4) up to --max-bytes, "
        "and fit t = alpha + n * beta (least squares of relative errors; each size's "
        "residual is reported). Then time the float32 SUM Allreduce of all ranks "
        "(MPI_Iallreduce as the gradient sync runs it, and the blocking MPI_Allreduce) and "
        "compare it with the cost model of the algorithm MPICH selects. Each measurement "
        "repeats for about --budget seconds (3 to --repeats times). The table goes to "
        "stdout; --json writes everything (the input of the cost model).", options=(
            arg("--sizes", metavar="BYTES[,BYTES...]",
                help="message sizes in bytes, comma separated (default: 8 B to --max-bytes "
                "in steps of x4)"),
            arg("--max-bytes", type=int, default=64 << 20, metavar="BYTES",
                help="the largest message (default 67108864 = 64 MiB)"),
            arg("--repeats", type=int, default=1000,
                help="at most this many repeats per measurement (default 1000)"),
            arg("--budget", type=float, default=0.2, metavar="SECONDS",
                help="seconds per measurement, about (default 0.2)"),
            arg("--json", metavar="FILE", help=JSON)))))

SCALING_RUN = Command(
    "run", "one training per mode, rank count and repeat, each in "
    "SWEEP_DIR/<mode>/p<ranks>-r<repeat>/, with SWEEP_DIR/sweep.json",
    description="Run a scaling study: the trainings one after another, through a launcher. "
    "Strong scaling keeps --batch-size as the global batch; weak scaling keeps it per rank "
    "and scales the learning rate linearly (--lr-scaling linear, --base-batch = "
    "--batch-size) unless --lr-scaling or the --config file chooses. The same command again "
    "continues a stopped sweep (finished points are kept) or extends it with more --ranks or "
    "--repeats. Ctrl-C, SIGTERM and SIGUSR1 reach the running training, which checkpoints; "
    "the sweep then ends with exit 3.",
    epilog="The driver does not start MPI; it removes PMI_*, PMIX_* and OMPI_* variables "
    "(keeping OMPI_MCA_* and OMPI_ALLOW_RUN_AS_ROOT*) from the trainings' environment and "
    "sets MPINN_OVERSUBSCRIBE=error there unless --oversubscribe, so that oversubscribed "
    "ranks refuse to train (exit 2). Then: mpinn scaling report SWEEP_DIR --out DIR.",
    options=(
        arg("--out", required=True, metavar="SWEEP_DIR",
            help="the sweep directory (created; an unfinished sweep there continues)"),
        arg("--ranks", metavar="N,N,...", help="rank counts (default 1, 2, 4, ... up to the "
            "CPUs this process may use, and that count)"),
        arg("--mode", choices=("strong", "weak", "both"), default="both",
            help="which study (default both)"),
        arg("--repeats", type=int, default=1, metavar="K",
            help="trainings per point, for the spread of the figures (default 1)"),
        arg("--launcher", metavar="'CMD {n} ...'",
            help="how to start N ranks, {n} standing for N, $VARIABLES expanded (default: "
            "the mpiexec beside this Python, `mpiexec -n {n}`); e.g. 'srun --ntasks={n}' "
            "inside an allocation"),
        arg("--oversubscribe", action="store_true",
            help="also run points with more ranks x BLAS threads than a host has CPUs "
            "(flagged as oversubscribed in the runs and the report)"),
        arg("--overwrite", action="store_true",
            help="replace a sweep with other settings in SWEEP_DIR"),
        arg("--no-calibrate", dest="calibrate", action="store_false",
            help="skip the cost model's benchmarks (bench step at each rank count, bench comm "
            "at the largest) that run first, through the launcher, into "
            "SWEEP_DIR/calibration/; the report then has no predictions")),
    train_options="sweep")

SCALING_REPORT = Command(
    "report", "points.csv, report.md and plots from one or more sweep directories",
    description="Summarise sweeps: one row per mode and rank count (averaged over repeats) "
    "with samples/s, per-phase step times, cross-rank imbalance, speedup, efficiency and the "
    "Karp-Flatt serial fraction; report.md with the tables and the environment; throughput, "
    "efficiency and per-phase plots (with matplotlib: pip install 'mpinn[plot]').", options=(
        arg("sweeps", nargs="+", metavar="SWEEP_DIR"),
        arg("--out", required=True, metavar="REPORT_DIR", help="where the report goes")))

SCALING_PROJECT = Command(
    "project", "efficiency and samples/s against ranks (to 4096) for a network given by its "
    "latency and bandwidth, strong and weak, with the overlap bound",
    description="Project a model's data-parallel training to many ranks with the cost model: "
    "T(P) = compute(B/P) + update + the Allreduce MPICH runs (recursive doubling or "
    "reduce-scatter + allgather, in two levels: shared memory within a node, the network "
    "between nodes). The compute comes from --bench-step (the JSON of `mpinn bench step "
    "--local-batches ...`, best measured with the ranks per node you will run) or, without "
    "it, from a bench step run here on one rank.",
    epilog="Example networks (see docs/costmodel.md): 10 GbE with TCP --alpha 25e-6 --beta 8e-10; "
    "InfiniBand HDR --alpha 1e-6 --beta 4e-11.", options=(
        arg("--alpha", type=float, metavar="SECONDS",
            help="network latency per message (required unless --comm has a network)"),
        arg("--beta", type=float, metavar="S_PER_BYTE",
            help="network inverse bandwidth, seconds per byte (1 / bytes per second)"),
        arg("--comm", metavar="FILE", help="`mpinn bench comm --json` results: the "
            "shared-memory link, gamma, and the network unless --alpha/--beta"),
        arg("--shm-alpha", type=float, metavar="SECONDS",
            help="latency between ranks of a node (default: --comm's, else the network's)"),
        arg("--shm-beta", type=float, metavar="S_PER_BYTE",
            help="inverse bandwidth between ranks of a node"),
        arg("--gamma", type=float, metavar="S_PER_BYTE", help="seconds per byte added in the "
            "reduction (default: --comm's, else measured here)"),
        arg("--ranks-per-node", type=int, default=1, metavar="K",
            help="ranks per node (default 1)"),
        arg("--bench-step", metavar="FILE",
            help="`mpinn bench step --local-batches ... --json` results: the model, its "
            "compute against rows per rank, and the update"),
        arg("--features", type=int, default=784,
            help="without --bench-step: the model's inputs (default 784)"),
        arg("--hidden", default="1024,1024", help="without --bench-step (default 1024,1024)"),
        arg("--classes", type=int, default=10, help="without --bench-step (default 10)"),
        arg("--dtype", choices=("float32", "float64"), default="float32",
            help="without --bench-step: the model's dtype (default float32)"),
        arg("--optimizer", choices=OPTIMIZERS, default="sgd",
            help="without --bench-step: the update timed (default sgd)"),
        arg("--global-batch", type=int, default=512, metavar="B",
            help="strong scaling's global batch, weak scaling's batch per rank (default 512)"),
        arg("--mode", choices=("strong", "weak", "both"), default="both",
            help="which projection (default both)"),
        arg("--max-ranks", type=int, default=4096, metavar="P",
            help="the largest rank count (default 4096; powers of two up to it)"),
        arg("--out", required=True, metavar="DIR",
            help="projection.csv, projection.md, projection.png")))

SCALING = Command(
    "scaling", "strong and weak scaling studies: run a sweep of trainings, report on it, "
    "project it to more ranks (serial; launches mpiexec itself)", dest="scaling_command",
    commands=(SCALING_RUN, SCALING_REPORT, SCALING_PROJECT))

PREDICT = Command(
    "predict", "write a checkpoint's outputs for input rows (serial)", options=(
        arg("checkpoint", help=FROM_CHECKPOINT),
        arg("input", help="HDF5 file with a dataset `x` (or `test/x`) of input rows"),
        arg("out", help="HDF5 file to write: `outputs` (and `predictions`)"),
        arg("--dataset", help="input dataset path inside INPUT (default x, then test/x)")))

EXPORT = Command(
    "export", "a trained model for serving: ONNX (needs onnx: pip install 'mpinn[onnx]') or "
    "plain arrays (npz); serial", description="Export a run's model (its best.h5 if early "
    "stopping kept one, else its checkpoint.h5) or a checkpoint file. A training file "
    "standardized by `data import --standardize` is folded into the first layer: the model "
    "takes raw inputs. Classifiers output softmax probabilities, regression models linear "
    "outputs.", options=(
        arg("checkpoint", help=FROM_CHECKPOINT),
        arg("out", help="the file to write (replaced atomically)"),
        arg("--format", choices=EXPORT_FORMATS, default="onnx",
            help="onnx (opset 13: input x, float32 rows; output probabilities or outputs) or "
            "npz (W0, b0, ..., input_mean, input_std and an `architecture` JSON text; "
            "default onnx)"),
        arg("--data", metavar="TRAIN.h5", help="the training file, for its class names and "
            "standardization (default: the one the run's configuration names)")))

PLOT = Command(
    "plot", "plot a run's loss, accuracy and macro F1 per epoch, or a --trace's timeline "
    "(serial; needs matplotlib: pip install 'mpinn[plot]')", options=(
        arg("run_dir", nargs="?", help="a run directory (its metrics.jsonl)"),
        arg("--trace", metavar="TRACE.json", help="instead: the timeline of the last "
            "--steps steps of a trace (mpinn train --trace), one band per rank"),
        arg("--steps", type=int, default=3, help="--trace: steps shown (default 3)"),
        arg("--out", metavar="FILE.png", help="image to write (default RUN_DIR/metrics.png; "
            "with --trace, TRACE.png)")))

MPINN = Command("mpinn", "", dest="command", commands=(
    DATA, TRAIN, EVALUATE, BENCH, SCALING, PREDICT, EXPORT, PLOT), options=(
        arg("--version", action="version", version=f"mpinn {__version__}"),))


def build_parser() -> Parser:
    """The parser of every command (the tables above)."""
    parser = Parser(prog="mpinn", description="Train multilayer perceptrons data-parallel "
                    "over MPI, with input from HDF5 files.", epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_commands(MPINN)
    return parser
