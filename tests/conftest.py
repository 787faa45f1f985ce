"""Shared helpers: launch real mpiexec jobs (always with a timeout), make data files.

The launcher is $MPINN_MPIEXEC (the Makefile exports the one that belongs to the
installed MPI), else the `mpiexec` beside this Python (the `mpich` wheel's),
else the first on PATH.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpinn.comm import shm
from mpinn.data import datasets

HERE = Path(__file__).resolve().parent
RANKS = (1, 2, 3, 4)  # rank counts the MPI tests run at; 4 ranks oversubscribe 2 cores
# the last lines of a script run with python -c: it may have loaded MPI, never started it
MPI_NOT_STARTED = ("import sys\nMPI = sys.modules.get('mpi4py.MPI')\n"
                   "assert MPI is None or not MPI.Is_initialized(), 'MPI was started'\n")


def mpiexec() -> str:
    candidates = [os.environ.get("MPINN_MPIEXEC"),
                  str(Path(sys.executable).parent / "mpiexec"), shutil.which("mpiexec")]
    for c in candidates:
        found = c and shutil.which(c)
        if found:
            return os.path.abspath(found)  # tests launch from other working directories too
    raise RuntimeError("no mpiexec found: run the tests through `make test`, or set "
                       "MPINN_MPIEXEC to your MPI's launcher")


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    return env


def start(cmd: list, cwd: Path | None = None, env: dict[str, str] | None = None
          ) -> subprocess.Popen:
    """Start cmd in its own process group (so that all of an mpiexec job can be killed)."""
    return subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env=env or child_env(), start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    """Wait for proc; on timeout kill its whole process group and fail the test (a hang)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s (a hang): {' '.join(proc.args)}\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(cmd: list, timeout: float = 120, cwd: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return finish(start(cmd, cwd, env), timeout)


def start_mpinn(n: int, *args) -> subprocess.Popen:
    """`mpiexec -n N python -m mpinn ARGS` in the background."""
    return start([mpiexec(), "-n", n, sys.executable, "-m", "mpinn", *args])


def rank_pids(marker: str) -> list[int]:
    """PIDs of the mpinn rank processes whose command line contains marker."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"mpinn" in cmd and marker.encode() in cmd \
                    and Path(cmd[0].decode(errors="replace")).name.startswith("python"):
                pids.append(int(entry.name))
    return sorted(pids)


def wait_for(condition, proc: subprocess.Popen, seconds: float = 60) -> None:
    """Poll condition() while proc runs; fail if proc ends first or time runs out."""
    deadline = time.monotonic() + seconds
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the job ended early: {proc.communicate()}")
        assert time.monotonic() < deadline, "timed out waiting for the job"
        time.sleep(0.05)


def mpinn(n: int | None, *args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """`mpiexec -n N python -m mpinn ARGS` (or serial with n=None)."""
    cmd = [sys.executable, "-m", "mpinn", *map(str, args)]
    if n is not None:
        cmd = [mpiexec(), "-n", str(n), *cmd]
    return run(cmd, timeout=timeout, **kw)


def mpi_script(n: int, name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run tests/mpi/NAME under mpiexec -n N."""
    return run([mpiexec(), "-n", str(n), sys.executable, str(HERE / "mpi" / name),
                *map(str, args)], timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def load_weights(checkpoint: Path) -> list[np.ndarray]:
    with h5py.File(checkpoint, "r") as f:
        n = len(f["model"].attrs["sizes"]) - 1
        return [f["model"][f"{k}{i}"][...] for i in range(n) for k in "Wb"]


# -- the fast tier: in-process tests (`pytest -m fast`, `make test-fast`) -----------------

LAUNCHERS = ("mpiexec", "mpirun", "srun", "sbatch", "salloc", "python")


@pytest.fixture(autouse=True)
def fast_tests_start_no_processes(request, monkeypatch) -> None:
    """A test marked fast runs mpinn in this process only: starting a launcher, a Python
    or anything of mpinn fails it (a library's own helper, such as fc-list, may run)."""
    if request.node.get_closest_marker("fast") is None:
        return
    execute = subprocess.Popen._execute_child

    def guarded(self, args, *rest, **kwargs):
        argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
        if Path(str(argv[0])).name.startswith(LAUNCHERS) or "mpinn" in " ".join(map(str, argv)):
            raise AssertionError(f"{request.node.name} is marked fast, and a fast test starts "
                                 f"no processes: {' '.join(map(str, argv))[:200]}")
        return execute(self, args, *rest, **kwargs)
    monkeypatch.setattr(subprocess.Popen, "_execute_child", guarded)


@pytest.fixture
def cli(capfd):
    """`mpinn ARGS` in this process, as a CompletedProcess: exit code and what it wrote
    to the file descriptors 1 and 2 (as the terminal would see it)."""
    from mpinn.cli.main import main

    def run_main(*args) -> subprocess.CompletedProcess:
        capfd.readouterr()
        argv = [str(a) for a in args]
        try:
            code = main(argv)
        except SystemExit as exc:  # --help and argparse's own exits
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(["mpinn", *argv], code, out, err)
    return run_main


# Data files are written in this process: `mpinn data synth` writes the same bytes (the
# content is a function of the arguments; tests/test_cli.py shows it).

def write_synth(path: Path, samples: int, test_samples: int, features: int, classes: int,
                seed: int) -> Path:
    datasets.write_synth(str(path), samples, features, classes, test_samples, seed)
    return path


def probed(path: Path) -> Path:
    """Record a file the tests wrote with mpinn's own writers as passed by the structure
    probe (data/probe.py), the verdict its child process would give: an in-process (fast)
    test may then open the file without starting that process."""
    from mpinn.data import probe
    marker = Path(probe.cache_dir()) / probe.cache_key(str(path))
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return path


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> Path:
    """A small synthetic classification file: 600 train / 150 test rows, 12 features."""
    return write_synth(tmp_path_factory.mktemp("data") / "synth.h5", samples=600,
                       test_samples=150, features=12, classes=4, seed=3)


def write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> None:
    """An MNIST-format idx file (gzipped if path ends in .gz)."""
    header = bytes([0, 0, code, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "digits.h5"
    datasets.write_digits(str(path))
    return path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skip from anywhere (a skipif, an importorskip) fails the test too."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") == "true" and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where nothing may skip: {report.longrepr}"


def unavailable(what: str, how: str) -> None:
    """Skip on a user's machine; under CI=true nothing may skip, so fail instead."""
    message = f"{what} is not available: {how}"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (required under CI=true)")
    pytest.skip(message)


class ParallelEnv:
    """The venv of `make parallel-hdf5`: h5py with MPI-IO, and its MPI's launcher.
    Other venvs with an MPI of their own (Open MPI's) change `command` and `env`."""

    def __init__(self, venv: Path) -> None:
        self.python = venv / "bin" / "python"
        self.mpiexec = venv / "bin" / "mpiexec"
        self.env = child_env()

    def command(self, n: int, *args) -> list:
        return [self.mpiexec, "-n", n, self.python, *args]

    def start_mpinn(self, n: int, *args) -> subprocess.Popen:
        return start(self.command(n, "-m", "mpinn", *args), env=self.env)

    def mpinn(self, n: int, *args, timeout: float = 180) -> subprocess.CompletedProcess:
        return run(self.command(n, "-m", "mpinn", *args), timeout=timeout, env=self.env)

    def script(self, n: int, name: str, *args, timeout: float = 180
               ) -> subprocess.CompletedProcess:
        return run(self.command(n, HERE / "mpi" / name, *args), timeout=timeout, env=self.env)


@pytest.fixture(scope="session")
def parallel_env() -> ParallelEnv:
    venv = Path(os.environ.get("MPINN_PARALLEL_VENV", HERE.parent / ".venv-phdf5"))
    if not (venv / ".mpinn-parallel-hdf5").exists():
        unavailable("the parallel-HDF5 environment", f"run `make parallel-hdf5` (builds {venv}; "
                    "needs root for Debian's libhdf5-mpich-dev, or HDF5_DIR of a site install)")
    return ParallelEnv(venv)


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    d = Path(os.environ.get("MPINN_FASHION_DIR", HERE.parent / ".venv" / "datasets"
                            / "fashion-mnist"))
    if not (d / "train-images-idx3-ubyte.gz").exists():
        unavailable("Fashion-MNIST", "run `make fashion-mnist` (Debian's dataset-fashion-mnist)")
    return d


def text_of(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def expect_error(result: subprocess.CompletedProcess, code: int, *words: str
                 ) -> subprocess.CompletedProcess:
    """Exit `code` with ONE mpinn message (from one rank), no traceback, containing words."""
    text = text_of(result)
    assert result.returncode == code, f"exit {result.returncode}, expected {code}\n{text}"
    prefix = {1: "mpinn: failed:", 2: "mpinn: error:", 3: "mpinn: stopped"}[code]
    assert text.count(prefix) == 1, text  # once, not once per rank
    assert "Traceback" not in text and "HDF5-DIAG" not in text and "Warning" not in text, text
    for word in words:
        if word not in text:  # (the whole text: an assertion's would be cut short)
            pytest.fail(f"{word!r} is not in the output:\n{text}")
    return result


def strict_json_lines(path: Path) -> list[dict]:
    """Every line of a JSON-lines file, parsed strictly (NaN or Infinity fail)."""
    def refuse(constant: str):
        raise AssertionError(f"{path}: {constant} is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def root_only(what: str) -> None:
    """Tests that mount file systems need root: skip elsewhere (fail under CI=true)."""
    if os.geteuid() != 0:
        unavailable(what, "run the tests as root (they mount a small tmpfs or a read-only "
                    "bind mount, and remove it after)")


@contextlib.contextmanager
def mounted(target: Path, *options: str) -> Iterator[Path]:
    """`mount OPTIONS target` for the duration; always unmounted after (root only)."""
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", *options, str(target)], check=True, timeout=30)
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False, timeout=30)


@contextlib.contextmanager
def read_only_view(source: Path, target: Path) -> Iterator[Path]:
    """source, seen read-only at target (a bind mount remounted ro: writes give EROFS)."""
    with mounted(target, "--bind", str(source)):
        subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True, timeout=30)
        yield target


def unprivileged(cmd: list) -> list:
    """cmd without the capabilities that let root ignore file permissions (so root, too,
    gets EACCES from a mode-555 directory); unchanged for a user, who lacks them anyway."""
    if os.geteuid() != 0:
        return cmd
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", *cmd]


def write_legacy_checkpoint(sealed: Path, legacy: Path) -> None:
    """A copy of a checkpoint as mpinn wrote them before digests: the same HDF5 objects,
    no userblock, so the file starts with HDF5's signature."""
    with h5py.File(sealed, "r") as src, h5py.File(legacy, "w") as dst:
        dst.attrs.update(src.attrs)
        for name in src:
            src.copy(name, dst)
    assert legacy.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"


@pytest.fixture(scope="session", autouse=True)
def probe_cache(tmp_path_factory) -> Path:
    """The structure probe's cache of the test session: in its temporary directory, not
    the user's ~/.cache/mpinn (every test and its children inherit it)."""
    cache = tmp_path_factory.mktemp("probe-cache")
    os.environ["MPINN_CACHE_DIR"] = str(cache)
    return cache


# Shared memory that MPI jobs leave in /dev/shm when a rank is killed or aborts: MPICH's
# segment per node and job, and UCX's. A test removes those that appeared while it ran
# and that no live process maps; the session fails if more are left than it found.
LEFTOVER_PREFIXES = ("mpich_shm_", "ucx_shm_posix_")


def shm_segments() -> set[Path]:
    try:
        return {p for p in shm.SHM_DIR.iterdir() if p.name.startswith(LEFTOVER_PREFIXES)}
    except OSError:
        return set()


def segments_in_use() -> set[Path]:
    """The segments some live process maps (any process: a job may still be running)."""
    used = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            used |= shm.mapped_segments(entry / "maps", LEFTOVER_PREFIXES)
    return used


def leftover_segments(before: set[Path]) -> set[Path]:
    """Segments that appeared since `before` and that no live process maps."""
    new = shm_segments() - before
    return new - segments_in_use() if new else set()


@pytest.fixture(autouse=True)
def no_shared_memory_left() -> Iterator[None]:
    before = shm_segments()
    yield
    for path in leftover_segments(before):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def pytest_sessionstart(session) -> None:
    session.config.shm_before = shm_segments()


def pytest_sessionfinish(session, exitstatus) -> None:
    left = sorted(p.name for p in leftover_segments(session.config.shm_before))
    if left:
        print(f"\n{len(left)} shared-memory segments left in {shm.SHM_DIR} by the suite: "
              f"{', '.join(left)}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
