"""The structure probe: an HDF5 file nothing vouches for is read first by a child process
with a time limit, before any rank opens it.

    python -m mpinn.data.probe FILE      # exit 0: readable; exit 2: one line saying why not

HDF5 trusts a file's metadata. A few corrupt bytes in it can make HDF5 loop
forever (every rank of a job inside HDF5, for good), crash, or fail on one rank
in the middle of training. Dataset files carry no digest (checkpoints do:
checkpoint.py), so before the ranks open one, rank 0 has this module's child
walk it: every group, dataset, named datatype and attribute (values read); each
dataset's shape, type and layout; the chunk index of chunked datasets (every
chunk inside the file) and the extent of contiguous data (inside the file, so
the readers' memory maps never reach past its end); the first and last row of
every dataset. A child that loops is killed at the time limit
(MPINN_PROBE_TIMEOUT, default 60 s); one that crashes is a verdict too. Either
way the job gets one message and exit 2, never a hang.

A passed file is remembered by (real path, size, mtime, ctime, inode, device) as
an empty marker file under $MPINN_CACHE_DIR (default ~/.cache/mpinn)/probe, so
each version of a file is probed once; an unwritable cache is skipped silently.
No MPI here: the child runs without the launcher's variables (PMI_*, PMIX_*,
OMPI_*, SLURM_*, ...), so that an h5py built with MPI cannot join the job. Nothing
in the file is ever unpickled or evaluated: h5py reads numbers and strings.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import signal
import subprocess
import sys

import h5py

from mpinn.base.errors import EXIT_OK, EXIT_USAGE, UsageError
from mpinn.base.hdf5 import HDF5_FAILURES, failure_reason

VERSION = 1  # part of the cache key: a better probe checks every file again
DEFAULT_TIMEOUT = 60.0  # seconds; a 1 GB dataset's structure takes well under one
LAUNCHER_VARS = ("PMI_", "PMIX_", "OMPI_", "SLURM_", "HYDRA_", "HYDI_", "I_MPI_", "MPI_LOCAL")
MAX_ROW_BYTES = 1 << 30  # a dataset row larger than this is a corrupt shape, not data


class Problem(Exception):
    """What the child found wrong with the file (one line)."""


def check(path: str) -> None:
    """UsageError unless the HDF5 file at path passes the probe (at most once per version
    of the file: the verdict is cached)."""
    marker = os.path.join(cache_dir(), cache_key(path))
    if os.path.exists(marker):
        return
    run_child(path)
    trust(path)


def trust(path: str) -> None:
    """Record the file at path as passed: it passed the probe, or mpinn's own writers
    have just written it whole (the cache key changes with any later change)."""
    marker = os.path.join(cache_dir(), cache_key(path))
    with contextlib.suppress(OSError):  # no cache then: the next run probes again
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        with open(marker, "w"):
            pass


def cache_key(path: str) -> str:
    """A name for this version of the file; UsageError if there is no such file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory, not an HDF5 file")
    ident = (VERSION, os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns,
             st.st_ino, st.st_dev)
    return hashlib.sha256(repr(ident).encode()).hexdigest()


def cache_dir() -> str:
    root = os.environ.get("MPINN_CACHE_DIR") or os.path.join(os.path.expanduser("~"),
                                                             ".cache", "mpinn")
    return os.path.join(root, "probe")


def timeout() -> float:
    spec = os.environ.get("MPINN_PROBE_TIMEOUT", "")
    try:
        seconds = float(spec) if spec else DEFAULT_TIMEOUT
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or math.isinf(seconds):
        raise UsageError(f"MPINN_PROBE_TIMEOUT must be a positive number of seconds, "
                         f"got {spec!r}")
    return seconds


def child_env() -> dict[str, str]:
    """This environment without the MPI launcher's variables, and with this mpinn first
    on the module path (the child must probe with the same code)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARS)}
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env


def run_child(path: str) -> None:
    """Run the probe on path in a child process; UsageError with its verdict if not good."""
    limit = timeout()
    try:
        done = subprocess.run([sys.executable, "-m", "mpinn.data.probe", path], env=child_env(),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              errors="replace", timeout=limit)
    except subprocess.TimeoutExpired:  # subprocess.run has killed it
        raise UsageError(f"HDF5 did not finish reading the structure of {path} within "
                         f"{limit:g} s: the file is probably corrupt (if it is merely huge, "
                         f"allow more: MPINN_PROBE_TIMEOUT=SECONDS)") from None
    said = (done.stdout.strip().splitlines() or [""])[-1]
    if done.returncode == EXIT_OK:
        return
    if done.returncode == EXIT_USAGE and said:
        raise UsageError(said)
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:  # a real-time signal has no name
            name = f"signal {-done.returncode}"
        raise UsageError(f"HDF5 crashed ({name}) reading the structure of {path}: the file "
                         f"is probably corrupt")
    detail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    raise UsageError(f"{path}: the structure probe failed (exit {done.returncode}: {detail})")


# ---- the child ----------------------------------------------------------------------

def walk(path: str) -> None:
    """Read the whole structure of the file (see the module's docstring); Problem if bad."""
    size = os.path.getsize(path)
    try:
        f = h5py.File(path, "r")
    except HDF5_FAILURES as exc:
        raise Problem(f"{path}: not a readable HDF5 file ({failure_reason(exc)})") from None
    with f:
        visit(path, size, "/", f)
        try:
            f.visititems(lambda name, obj: visit(path, size, "/" + name, obj))
        except HDF5_FAILURES as exc:
            raise Problem(f"{path}: HDF5 cannot walk the file's groups "
                          f"({failure_reason(exc)}); the file is probably corrupt") from None


def visit(path: str, size: int, name: str, obj: h5py.HLObject) -> None:
    """Read an object's attributes and, for a dataset, its layout and first and last rows."""
    try:
        for key in obj.attrs:
            _ = obj.attrs[key]
        if isinstance(obj, h5py.Dataset):
            check_dataset(obj, size)
        elif isinstance(obj, h5py.Datatype):
            _ = obj.dtype
    except Problem as exc:
        raise Problem(f"{path}: {name}: {exc}; the file is probably corrupt") from None
    except HDF5_FAILURES as exc:
        raise Problem(f"{path}: HDF5 cannot read {name} ({failure_reason(exc)}); the file is "
                      f"probably corrupt") from None


def check_dataset(d: h5py.Dataset, size: int) -> None:
    if d.shape is None:  # an empty dataspace: nothing stored
        return
    stored = d.id.get_type().get_size()  # bytes per value in the file
    layout = d.id.get_create_plist().get_layout()
    if layout == h5py.h5d.CONTIGUOUS:
        offset = d.id.get_offset()
        end = (offset or 0) + math.prod(d.shape) * stored
        if offset is not None and end > size:
            raise Problem(f"its {d.shape} values of {stored} bytes would end at byte {end}, "
                          f"beyond the file's {size} bytes")
    elif layout == h5py.h5d.CHUNKED:
        check_chunks(d, size)
    if d.ndim == 0:
        _ = d[()]
    elif d.shape[0]:
        if math.prod(d.shape[1:]) * stored > MAX_ROW_BYTES:
            raise Problem(f"a row of its shape {d.shape} would take more than "
                          f"{MAX_ROW_BYTES >> 30} GiB")
        _ = d[0], d[d.shape[0] - 1]


def check_chunks(d: h5py.Dataset, size: int) -> None:
    """Walk the chunk index: every stored chunk must lie inside the file."""
    def inside(info) -> None:
        if info.byte_offset is not None and info.byte_offset + info.size > size:
            raise Problem(f"its chunk at {info.chunk_offset} would end at byte "
                          f"{info.byte_offset + info.size}, beyond the file's {size} bytes")
    if hasattr(d.id, "chunk_iter"):  # HDF5 >= 1.14: one pass over the index
        d.id.chunk_iter(inside)
    else:  # older HDF5: each lookup walks the index (fine for thousands of chunks)
        for i in range(d.id.get_num_chunks()):
            inside(d.id.get_chunk_info(i))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m mpinn.data.probe FILE", file=sys.stderr)
        return EXIT_USAGE
    try:
        walk(argv[0])
    except Problem as exc:
        print(exc, flush=True)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - whatever the file does to h5py is a verdict
        print(f"{argv[0]}: HDF5 cannot read its structure ({type(exc).__name__}: "
              f"{failure_reason(exc)}); the file is probably corrupt", flush=True)
        return EXIT_USAGE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
