"""Every writer on a full or read-only disk, and a parallel write that fails on one rank:
one message, exit 1 on every rank, within seconds, and no temporary (or half) file.

Full disks are small tmpfs mounts (root); a failure on one rank is injected into a real
parallel write (tests/mpi/fail_write.py), after the collective step it follows."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    expect_error,
    mounted,
    mpi_script,
    mpinn,
    ok,
    read_only_view,
    root_only,
    write_idx,
    write_synth,
)
from mpinn.base.errors import StorageError

NO_SPACE = "No space left on device (ENOSPC)"
BIG = ("--samples", 20000, "--features", 64)  # 6 MB: more than the 3 MB disk


@contextlib.contextmanager
def small_disk(tmp_path: Path, size: str = "3m") -> Iterator[Path]:
    root_only("a small tmpfs (ENOSPC)")
    with mounted(tmp_path / "disk", "-t", "tmpfs", "-o", f"size={size}", "tmpfs") as disk:
        yield disk


def refused(run, disk: Path, *words: str) -> None:
    """run() ends within seconds with exit 1, one message with words, nothing left."""
    began = time.monotonic()
    expect_error(run(), 1, *words)
    assert time.monotonic() - began < 30
    assert not list(disk.iterdir()), list(disk.iterdir())


@pytest.mark.parametrize("ranks", [None, 2], ids=["serial", "2 ranks"])
def test_synth_on_a_full_disk(ranks, tmp_path):
    with small_disk(tmp_path) as disk:
        refused(lambda: mpinn(ranks, "data", "synth", disk / "d.h5", *BIG, timeout=60), disk,
                NO_SPACE, f"cannot write {disk / 'd.h5'}", "it needs 6.", "MB free there now")


def test_synth_with_parallel_hdf5_on_a_full_disk(parallel_env, tmp_path):
    with small_disk(tmp_path) as disk:
        refused(lambda: parallel_env.mpinn(2, "data", "synth", disk / "d.h5", *BIG,
                                           "--io", "mpio", timeout=60), disk, NO_SPACE)


def test_digits_and_idx_on_a_full_disk(tmp_path):
    source = tmp_path / "idx"
    source.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 3000), ("t10k", 500)):  # 9.4 MB as float32
        write_idx(source / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28),
                                                                      dtype=np.uint8))
        write_idx(source / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))
    with small_disk(tmp_path, "256k") as disk:  # the digits file takes 0.5 MB
        refused(lambda: mpinn(None, "data", "digits", disk / "g.h5"), disk, NO_SPACE)
        refused(lambda: mpinn(None, "data", "idx", disk / "i.h5", "--from", source), disk,
                NO_SPACE)


def test_predict_plot_and_a_report_on_a_full_disk(synth, tmp_path):
    run = tmp_path / "run"
    ok(mpinn(1, "train", synth, "--out", run, "--epochs", 2, "--hidden", 8))
    rows = write_synth(tmp_path / "rows.h5", samples=10, test_samples=100_000, features=12,
                       classes=4, seed=1)  # predictions of 2.4 MB
    with small_disk(tmp_path, "1m") as disk:
        refused(lambda: mpinn(None, "predict", run, rows, disk / "p.h5"), disk, NO_SPACE)
    with small_disk(tmp_path, "8k") as disk:  # a plot takes tens of kB
        refused(lambda: mpinn(None, "plot", run, "--out", disk / "m.png"), disk, NO_SPACE)


@pytest.mark.parametrize("command", ["synth", "synth 2 ranks", "digits"])
def test_writers_on_a_read_only_file_system(command, tmp_path):
    root_only("a read-only bind mount (EROFS)")
    (tmp_path / "dir").mkdir()
    with read_only_view(tmp_path / "dir", tmp_path / "ro") as view:
        ranks = 2 if command.endswith("2 ranks") else None
        args = ["data", "synth", view / "d.h5", "--samples", 100] if command.startswith(
            "synth") else ["data", "digits", view / "g.h5"]
        refused(lambda: mpinn(ranks, *args), view, "Read-only file system (EROFS)",
                "write the run elsewhere")


@pytest.mark.parametrize("kind,call", [("storage", 3), ("storage", 1), ("bug", 2)])
def test_a_write_failing_on_one_rank_ends_every_rank(kind, call, tmp_path):
    out = tmp_path / "d.h5"
    began = time.monotonic()
    result = mpi_script(2, "fail_write.py", 1, call, kind, "--", "data", "synth", out,
                        "--samples", 200_000, "--features", 8, timeout=60)
    assert time.monotonic() - began < 30
    if kind == "storage":  # agreed: one message, every rank exits 1
        expect_error(result, 1, "injected ENOSPC on rank 1", str(out))
    else:  # a bug on one rank: it says so, once, and aborts the job
        assert result.returncode == 1, result
        assert result.stderr.count("mpinn: rank 1 of 2 failed") == 1, result.stderr
        assert result.stderr.count("RuntimeError: injected bug on rank 1") == 1, result.stderr
    assert not list(tmp_path.iterdir())  # no temporary file


def test_a_parallel_hdf5_write_failing_on_one_rank_ends_every_rank(parallel_env, tmp_path):
    out = tmp_path / "d.h5"
    began = time.monotonic()
    result = parallel_env.script(2, "fail_write.py", 1, 3, "storage", "--", "data", "synth",
                                 out, "--samples", 200_000, "--features", 8, "--io", "mpio",
                                 timeout=60)
    assert time.monotonic() - began < 30
    expect_error(result, 1, NO_SPACE, str(out))
    assert not list(tmp_path.iterdir())


@pytest.mark.fast
@pytest.mark.parametrize("error_class,words", [
    ("ERR_NO_SPACE", ["No space left on device (ENOSPC)", "MB free there now"]),
    ("ERR_QUOTA", ["(EDQUOT)", "quota"]),
    ("ERR_READ_ONLY", ["Read-only file system (EROFS)"]),
    ("ERR_ACCESS", ["Permission denied (EACCES)"]),
    ("ERR_IO", ["(EIO)"]),
])
def test_a_refused_mpi_io_write_is_a_storage_error(error_class, words, tmp_path):
    from mpi4py import MPI

    from mpinn.comm import mpiio, world
    world.start()
    with pytest.raises(StorageError) as raised, mpiio.refused_writes(str(tmp_path / "d.h5")):
        raise MPI.Exception(getattr(MPI, error_class))
    assert str(raised.value).startswith(f"cannot write {tmp_path / 'd.h5'}: ")
    for word in words:
        assert word in str(raised.value), str(raised.value)


@pytest.mark.fast
@pytest.mark.parametrize("failure,words", [
    (RuntimeError("Can't write data (file write failed: time = x, filename = 'f', file "
                  "descriptor = 3, errno = 28, error message = 'No space left on device')"),
     ["No space left on device (ENOSPC)"]),
    (OSError(122, "Disk quota exceeded"), ["(EDQUOT)"]),
    (OSError("Can't write data (no appropriate function for conversion path)"),
     ["no appropriate function for conversion path"]),
])
def test_a_failed_hdf5_write_is_a_storage_error(failure, words, tmp_path):
    from mpinn.base.reserved import hdf5_write_errors
    with pytest.raises(StorageError) as raised, hdf5_write_errors(str(tmp_path / "d.h5")):
        raise failure
    assert str(raised.value).startswith(f"cannot write {tmp_path / 'd.h5'}: ")
    for word in words:
        assert word in str(raised.value), str(raised.value)
