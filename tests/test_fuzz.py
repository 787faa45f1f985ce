"""Fuzzing: seeded byte-level mutations of a small dataset and of checkpoints, through
`data inspect --check`, `train` and `evaluate`. Every outcome is exit 0 or exit 2 with
exactly one message: no traceback, no crash (killed by a signal), no hang. A mutated
checkpoint loads (exit 0) only if the bytes its digest vouches for are intact.

One `python -m mpinn` per case would cost ~0.7 s. Instead this file, run as a script,
is a driver that has imported mpinn.cli but not started MPI, and forks one child per case:
the child sends its output to a file, runs cli.main(argv) in-process (train and
evaluate start MPI there as a singleton: MPICH needs no mpiexec for that) and exits
with its code; anything raised is a traceback (exit 99). Two children run at a
time; one that overruns its deadline is killed with its process group: a hang. The
driver is a process of its own because the pytest process may have started MPI
already (other test modules import mpi4py), and nothing may fork after MPI_Init.
"""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 8
DATA_CASES = 170  # mutated datasets: each through `data inspect --check` and `train`
CHECKPOINT_CASES = 110  # mutated checkpoints (with a digest): `evaluate`
LEGACY_CASES = 40  # mutated checkpoints without a digest (older mpinn): `evaluate`
EDGE = 4096  # half the mutations fall in the first or last 4 KiB: HDF5's metadata
DEADLINE = 60.0  # seconds a case may take (the probe's limit is 5 s)
TRAIN = ["--epochs", "1", "--hidden", "4", "--batch-size", "16"]


def test_corrupt_files_give_one_message_and_never_hang(tmp_path):
    from conftest import run
    began = time.monotonic()
    result = run([sys.executable, __file__, str(tmp_path)], timeout=400)
    assert result.stdout.strip(), result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(report["counts"].items()))
    print(f"\nfuzz: {report['cases']} runs of {report['files']} mutated files in "
          f"{time.monotonic() - began:.0f} s; exit codes {counts}; seconds {report['seconds']}")
    assert report["files"] >= 300
    assert not report["problems"], (counts, "\n\n".join(report["problems"][:10]))
    # the mutations reached every outcome, or they tested little
    assert report["counts"]["data/inspect"].get("2", 0) > 20
    assert report["counts"]["checkpoint/evaluate"].get("2", 0) > 50


# ---- the driver (a process of its own) ----------------------------------------------

@dataclass
class Case:
    group: str  # e.g. data/train
    argv: list[str]
    log: Path
    file: Path  # the mutated file
    mutation: str
    pid: int = 0
    started: float = 0.0
    status: int | None = None  # exit code, -signal, or None: killed at the deadline
    seconds: float = 0.0


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A bit flip, a truncation or a zeroed range; half of them near either end."""
    n = len(data)
    if rng.random() < 0.5:
        near = rng.randrange(min(EDGE, n))
        pos = near if rng.random() < 0.5 else n - 1 - near
    else:
        pos = rng.randrange(n)
    kind = rng.choice(("flip", "truncate", "zero"))
    if kind == "truncate":
        return data[:pos], f"truncated to {pos} of {n} bytes"
    b = bytearray(data)
    if kind == "flip":
        bit = rng.randrange(8)
        b[pos] ^= 1 << bit
        return bytes(b), f"bit {bit} of byte {pos} flipped"
    length = rng.randint(1, 64)
    b[pos:pos + length] = bytes(len(b[pos:pos + length]))
    return bytes(b), f"bytes {pos}..{pos + length - 1} zeroed"


def spawn(case: Case) -> None:
    """Fork a child that runs `mpinn ARGV` in-process, its output into case.log."""
    from mpinn.cli import main as cli
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        case.pid, case.started = pid, time.monotonic()
        return
    code = 99
    try:
        os.setpgid(0, 0)  # its own group: a hang is killed with the probe it started
        fd = os.open(case.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = cli.main(case.argv)
    except BaseException:  # noqa: BLE001 - a traceback is what the test looks for
        traceback.print_exc()
        code = 99
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def run_cases(cases: list[Case], parallel: int = 2) -> None:
    """Run the cases, `parallel` at a time, each within DEADLINE."""
    pending, running = list(reversed(cases)), []
    while pending or running:
        while pending and len(running) < parallel:
            running.append(pending.pop())
            spawn(running[-1])
        time.sleep(0.005)
        for case in list(running):
            pid, status = os.waitpid(case.pid, os.WNOHANG)
            if pid:
                case.status = os.waitstatus_to_exitcode(status)
            elif time.monotonic() - case.started > DEADLINE:
                os.killpg(case.pid, signal.SIGKILL)
                os.waitpid(case.pid, 0)
                case.status = None
            else:
                continue
            case.seconds = time.monotonic() - case.started
            running.remove(case)


def problem(case: Case, original: bytes) -> str | None:
    """What is wrong with a case's outcome, or None."""
    text = case.log.read_text(errors="replace")
    if case.status is None:
        return f"hang (killed after {DEADLINE:g} s)"
    if case.status < 0:
        return f"crashed: killed by {signal.Signals(-case.status).name}"
    if case.status == 99 or "Traceback" in text:
        return "traceback"
    if "HDF5-DIAG" in text:
        return "HDF5's error dump"
    if case.status == 2:
        return None if text.count("mpinn: error:") == 1 else "not exactly one message"
    if case.status == 0:
        if "mpinn: error" in text:
            return "exit 0 with an error message"
        if case.group.startswith("checkpoint/") and case.file.read_bytes()[512:] != original[512:]:
            return "exit 0 from a checkpoint whose checksummed bytes changed"
        return None
    if case.status == 1 and case.group == "data/train" and "training diverged" in text \
            and text.count("mpinn: failed:") == 1:
        return None  # a flipped exponent: |x| ~ 1e38 is diverging input, named as such
    return f"exit {case.status}"


def make_base(work: Path) -> tuple[Path, Path, Path]:
    """The dataset, a checkpoint trained on it, and that checkpoint without a digest."""
    sys.path.insert(0, str(HERE))
    from conftest import write_legacy_checkpoint
    data, run_dir = work / "data.h5", work / "base-run"
    base = [Case("base", ["data", "synth", str(data), "--samples", "48", "--test-samples",
                          "16", "--features", "4", "--classes", "3"], work / "synth.log", data,
                 ""),
            Case("base", ["train", str(data), "--out", str(run_dir), *TRAIN], work / "train.log",
                 data, "")]
    for case in base:
        run_cases([case], parallel=1)
        assert case.status == 0, case.log.read_text()
    write_legacy_checkpoint(run_dir / "checkpoint.h5", work / "legacy.h5")
    return data, run_dir / "checkpoint.h5", work / "legacy.h5"


def build_cases(work: Path, data: Path, ckpt: Path, legacy: Path) -> list[Case]:
    rng = random.Random(SEED)
    inspect, train, evaluate = [], [], []
    for i in range(DATA_CASES):
        mutated, how = mutate(data.read_bytes(), rng)
        path = work / f"data-{i}.h5"
        path.write_bytes(mutated)
        inspect.append(Case("data/inspect", ["data", "inspect", "--check", str(path)],
                            work / f"data-{i}-inspect.log", path, how))
        train.append(Case("data/train", ["train", str(path), "--out", str(work / f"run-{i}"),
                                         *TRAIN], work / f"data-{i}-train.log", path, how))
    for kind, source, n in (("checkpoint", ckpt, CHECKPOINT_CASES),
                            ("legacy", legacy, LEGACY_CASES)):
        for i in range(n):
            mutated, how = mutate(source.read_bytes(), rng)
            path = work / f"{kind}-{i}.h5"
            path.write_bytes(mutated)
            evaluate.append(Case(f"{kind}/evaluate", ["evaluate", str(path), str(data)],
                                 work / f"{kind}-{i}.log", path, how))
    # every file's inspection before its training, so training finds the probe's verdict
    return inspect + train + evaluate


def drive(work: Path) -> dict:
    os.environ.update(MPINN_PROBE_TIMEOUT="5", MPINN_CACHE_DIR=str(work / "cache"),
                      OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    import mpinn.cli.main  # noqa: F401 - imported before forking, so each child starts warm
    MPI = sys.modules.get("mpi4py.MPI")  # loaded by the import, not started (a script: no conftest)
    assert MPI is None or not MPI.Is_initialized(), "MPI must start in the children only"
    data, ckpt, legacy = make_base(work)
    originals = {"data": data.read_bytes(), "checkpoint": ckpt.read_bytes(),
                 "legacy": legacy.read_bytes()}
    cases = build_cases(work, data, ckpt, legacy)
    run_cases(cases)
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    seconds: collections.Counter = collections.Counter()
    problems = []
    for case in cases:
        counts[case.group][str(case.status)] += 1
        seconds[case.group] += case.seconds
        found = problem(case, originals[case.group.split("/")[0]])
        if found:
            tail = "\n".join(case.log.read_text(errors="replace").splitlines()[-12:])
            problems.append(f"{found}: mpinn {' '.join(case.argv)} ({case.mutation})\n{tail}")
    for run_dir in work.glob("run-*"):
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"files": DATA_CASES + CHECKPOINT_CASES + LEGACY_CASES, "cases": len(cases),
            "counts": {k: dict(v) for k, v in counts.items()},
            "seconds": {k: round(v, 1) for k, v in seconds.items()}, "problems": problems}


if __name__ == "__main__":
    print(json.dumps(drive(Path(sys.argv[1]))))
