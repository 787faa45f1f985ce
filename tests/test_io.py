"""Parallel HDF5 input and output: both readers, collective MPI-IO, parallel writes,
idx conversion, real Fashion-MNIST training; the structure probe of untrusted files, and
corrupt data that HDF5 cannot read."""

from __future__ import annotations

import json
import os
import subprocess

import h5py
import numpy as np
import pytest

from conftest import (
    RANKS,
    expect_error,
    load_weights,
    mpi_script,
    mpinn,
    ok,
    write_idx,
    write_synth,
)
from mpinn.base.errors import UsageError
from mpinn.data import probe


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return write_synth(tmp_path_factory.mktemp("io") / "small.h5", samples=301,
                       test_samples=40, features=6, classes=3, seed=2)


@pytest.mark.parametrize("n", RANKS)
def test_independent_reader_delivers_the_planned_rows(n, small):
    result = ok(mpi_script(n, "readers_agree.py", small, 16, 50, 301, timeout=120))
    assert f"readers agree: independent on {n} ranks" in result.stdout


def test_parallel_environment_has_mpi_hdf5(parallel_env):
    result = ok(parallel_env.script(2, "collectives.py", timeout=60))
    assert "collectives ok on 2 ranks" in result.stdout
    probe = ok(parallel_env.mpinn(1, "--version"))
    assert "mpinn" in probe.stdout
    from conftest import run
    config = ok(run([str(parallel_env.python), "-c",
                     "import h5py; print(h5py.get_config().mpi)"]))
    assert config.stdout.strip() == "True"


@pytest.mark.parametrize("n", RANKS)
def test_both_readers_deliver_identical_batches_collectively(n, small, parallel_env):
    """mpio (collective MPI-IO) and independent give the oracle's rows at every step."""
    result = ok(parallel_env.script(n, "readers_agree.py", small, 16, 50, timeout=300))
    assert f"readers agree: independent mpio on {n} ranks" in result.stdout


def train_args(data, out, io, *extra):
    return ["train", data, "--out", out, "--io", io, "--hidden", "8", "--dtype", "float64",
            "--batch-size", 50, "--epochs", 2, "--seed", 3, *extra]


def test_p_invariance_with_the_mpio_reader(small, parallel_env, tmp_path):
    weights = {}
    for n in (1, 2, 3):
        out = tmp_path / f"mpio{n}"
        ok(parallel_env.mpinn(n, *train_args(small, out, "mpio"), timeout=300))
        weights[n] = np.concatenate([w.ravel() for w in load_weights(out / "checkpoint.h5")])
        summary = json.loads((out / "summary.json").read_text())
        assert summary["io"]["reader"] == "mpio"
        modes = summary["io"]["mpio_actual_io_modes"]
        assert modes and set(modes) <= {"contiguous-collective", "chunk-collective",
                                        "chunk-mixed"}, modes
    for n in (2, 3):
        rel = np.linalg.norm(weights[n] - weights[1]) / np.linalg.norm(weights[1])
        assert rel <= 1e-12, (n, rel)
    # the other reader, same P: the same batches, so the very same weights
    ok(parallel_env.mpinn(2, *train_args(small, tmp_path / "ind2", "independent")))
    independent = np.concatenate([w.ravel() for w in load_weights(tmp_path / "ind2" /
                                                                  "checkpoint.h5")])
    np.testing.assert_array_equal(independent, weights[2])


def test_block_shuffle_trains_and_reads_in_windows(small, tmp_path):
    out = tmp_path / "block"
    ok(mpinn(2, "train", small, "--out", out, "--shuffle", "block", "--block-rows", 16,
             "--window-rows", 100, "--hidden", "8", "--epochs", 2, "--batch-size", 20))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["io"]["shuffle"] == "block"
    assert summary["io"]["train_bytes_read"] == 2 * 301 * (6 * 4 + 4)  # each row once per epoch


def compare_files(a, b) -> None:
    with h5py.File(a) as fa, h5py.File(b) as fb:
        for split in ("train", "test"):
            for name in ("x", "y"):
                da, db = fa[split][name], fb[split][name]
                assert da.shape == db.shape and da.dtype == db.dtype
                for start in range(0, len(da), 1 << 20):
                    assert np.array_equal(da[start:start + (1 << 20)], db[start:start + (1 << 20)])
        assert dict(fa.attrs) == dict(fb.attrs)


def test_a_1gb_file_written_by_2_ranks_equals_a_serial_write(tmp_path):
    args = ["data", "synth", "--samples", 4_000_000, "--features", 64, "--classes", 10,
            "--test-samples", 100_000, "--seed", 1]
    serial, parallel = tmp_path / "serial.h5", tmp_path / "parallel.h5"
    ok(mpinn(None, *args[:2], serial, *args[2:], timeout=300))
    result = ok(mpinn(2, *args[:2], parallel, *args[2:], "--io", "independent", timeout=300))
    assert "written by 2 ranks (independent)" in result.stdout
    assert serial.stat().st_size > 1e9
    compare_files(serial, parallel)
    assert not list(tmp_path.glob(".*tmp*"))


def test_parallel_write_of_an_empty_test_split(tmp_path):
    result = ok(mpinn(2, "data", "synth", tmp_path / "e.h5", "--samples", 100,
                      "--test-samples", 0, "--io", "independent"))
    assert "/test/x: shape (0, 32)" in result.stdout
    trained = ok(mpinn(2, "train", tmp_path / "e.h5", "--out", tmp_path / "run", "--epochs", 1,
                       "--hidden", "4"))
    assert "test: no rows" in trained.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test_loss"] is None and summary["test_accuracy"] is None


def test_mpio_writes_equal_a_serial_write(parallel_env, tmp_path):
    args = ["--samples", 50_000, "--features", 20, "--classes", 4, "--test-samples", 999]
    ok(mpinn(None, "data", "synth", tmp_path / "serial.h5", *args))
    for n in (2, 3):
        result = ok(parallel_env.mpinn(n, "data", "synth", tmp_path / f"mpio{n}.h5", *args,
                                       "--io", "mpio", timeout=300))
        assert f"written by {n} ranks (mpio)" in result.stdout
        compare_files(tmp_path / "serial.h5", tmp_path / f"mpio{n}.h5")


def test_idx_conversion(cli, tmp_path):
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 256, (n, 4, 3), dtype=np.uint8) for s, n in
              (("train", 30), ("t10k", 7))}
    labels = {s: rng.integers(0, 5, len(images[s]), dtype=np.uint8) for s in images}
    src = tmp_path / "idx"
    src.mkdir()
    for s in images:  # one split gzipped, the other plain: both must work
        suffix = ".gz" if s == "train" else ""
        write_idx(src / f"{s}-images-idx3-ubyte{suffix}", images[s])
        write_idx(src / f"{s}-labels-idx1-ubyte{suffix}", labels[s])
    out = tmp_path / "out.h5"
    ok(cli("data", "idx", out, "--from", src))
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["train/x"][...],
                                      (images["train"].reshape(30, 12) / 255.0).astype(np.float32))
        np.testing.assert_array_equal(f["test/y"][...], labels["t10k"])
        assert f["train/x"].dtype == np.float32 and f.attrs["classes"] == 5
        assert f["test/x"][...].max() <= 1.0
    (src / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")
    expect_error(cli("data", "idx", tmp_path / "bad.h5", "--from", src), 2, "truncated")
    assert not (tmp_path / "bad.h5").exists()


def test_inspect_check_finds_bad_values(cli, small, tmp_path):
    assert "all valid" in ok(cli("data", "inspect", "--check", small)).stdout
    broken = tmp_path / "nan.h5"
    broken.write_bytes(small.read_bytes())
    with h5py.File(broken, "r+") as f:
        f["train/x"][17, 2] = np.nan
    expect_error(cli("data", "inspect", "--check", broken), 2, "/train/x row 17 is not finite")


def test_bench_io_reports_every_mode(small, tmp_path):
    out = tmp_path / "bench.json"
    result = ok(mpinn(2, "bench", "io", small, "--batch-size", 32, "--steps", 8,
                      "--hidden", "8", "--json", out))
    report = json.loads(out.read_text())
    assert {(m["reader"], m["shuffle"]) for m in report["modes"]} >= {
        ("independent", s) for s in ("global", "block", "none")}
    for m in report["modes"]:
        assert m["bytes"] > 0 and m["cold_read_vs_raw"] > 0 and m["warm_read_vs_raw"] > 0
    block = next(m for m in report["modes"] if m["shuffle"] == "block")
    assert block["reads_per_rank"] < 8  # a window is read at once, not per step
    assert 0 <= report["training_data_wait_fraction"]["independent"] < 1
    assert "data wait" in result.stdout


@pytest.mark.parametrize("n", (1, 2))
def test_bench_step_reports_ratios(n, tmp_path):
    out = tmp_path / "step.json"
    result = ok(mpinn(n, "bench", "step", "--features", 64, "--hidden", "128", "--batch-size",
                      64, "--steps", 5, "--json", out))
    report = json.loads(out.read_text())
    # the gradients and the sync's 3 control slots (loss, stop, bad input), float32
    assert report["ranks"] == n and report["allreduce_bytes"] == (64 * 128 + 128 + 128 * 10
                                                                  + 10 + 3) * 4
    assert 0 < report["compute_vs_gemm_peak"] < 2
    assert report["sync"] == "overlap" and report["update_s"] > 0
    assert report["anonymous_rss_bytes_per_rank"] > report["model_bytes"] > 0
    if n == 1:  # nothing to exchange: no ratio to a bare Allreduce
        assert report["sync_vs_raw"] is None and "nothing to exchange" in result.stdout
    else:
        assert report["sync_vs_raw"] > 0 and 0 <= report["sync_exposed_s"]
        assert "exposed after backward" in result.stdout and "bare MPI Allreduce" in result.stdout
    assert "GEMM" in result.stdout


def test_fashion_mnist_4_ranks(fashion_dir, tmp_path):
    data = tmp_path / "fashion.h5"
    ok(mpinn(None, "data", "idx", data, "--from", fashion_dir, timeout=300))
    out = tmp_path / "run"
    result = ok(mpinn(4, "train", data, "--out", out, "--hidden", "256", "--optimizer", "adam",
                      "--lr", 0.001, "--batch-size", 128, "--epochs", 3, timeout=600))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.85, summary
    assert summary["ranks"] == 4
    print(result.stdout)


# ---- untrusted files ------------------------------------------------------------------

def chunked_copy(source, path, corrupt_chunk: int | None = None, split: str = "train") -> None:
    """source's dataset with x stored in gzip chunks of 10 rows; optionally one chunk of
    split/x overwritten with garbage (HDF5 then fails to decompress it)."""
    with h5py.File(source, "r") as src, h5py.File(path, "w") as dst:
        dst.attrs.update(src.attrs)
        for part in ("train", "test"):
            x = src[part]["x"][...]
            dst.create_dataset(f"{part}/x", data=x, chunks=(10, x.shape[1]), compression="gzip")
            dst[f"{part}/y"] = src[part]["y"][...]
    if corrupt_chunk is not None:
        with h5py.File(path, "r") as f:
            info = f[f"{split}/x"].id.get_chunk_info(corrupt_chunk)
        with open(path, "r+b") as f:
            f.seek(info.byte_offset)
            f.write(b"\xa5" * info.size)


def counting_spawns(monkeypatch) -> list:
    spawned = []
    real = subprocess.run

    def run(*args, **kwargs):
        spawned.append(args[0])
        return real(*args, **kwargs)
    monkeypatch.setattr(probe.subprocess, "run", run)
    return spawned


def test_the_probe_runs_once_per_version_of_a_file(small, tmp_path, monkeypatch):
    monkeypatch.setenv("MPINN_CACHE_DIR", str(tmp_path / "cache"))
    spawned = counting_spawns(monkeypatch)
    path = tmp_path / "data.h5"
    path.write_bytes(small.read_bytes())
    probe.check(str(path))
    probe.check(str(path))
    assert len(spawned) == 1 and spawned[0][1:3] == ["-m", "mpinn.data.probe"]
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1000))
    probe.check(str(path))  # touched: maybe another file now
    assert len(spawned) == 2
    path.write_bytes(small.read_bytes()[:4000])
    for _ in range(2):  # a bad verdict is not cached: the file may be fixed in place
        with pytest.raises(UsageError, match="not a readable HDF5 file"):
            probe.check(str(path))
    assert len(spawned) == 4
    monkeypatch.setenv("MPINN_CACHE_DIR", "/proc/no-cache-here")  # unwritable: no cache
    probe.check(str(small))
    probe.check(str(small))
    assert len(spawned) == 6


def test_the_probe_has_a_time_limit_and_no_launcher_variables(small, tmp_path, monkeypatch):
    monkeypatch.setenv("MPINN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MPINN_PROBE_TIMEOUT", "0.001")
    with pytest.raises(UsageError, match=r"did not finish reading the structure of .* within "
                                         r"0.001 s: the file is probably corrupt"):
        probe.check(str(small))
    monkeypatch.setenv("MPINN_PROBE_TIMEOUT", "soon")
    with pytest.raises(UsageError, match="MPINN_PROBE_TIMEOUT must be a positive number"):
        probe.check(str(small))
    for var in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):
        monkeypatch.setenv(var, "1")
    env = probe.child_env()
    assert not [v for v in env if v.startswith(("PMI", "OMPI_", "SLURM_"))], env
    assert env["PYTHONPATH"].split(os.pathsep)[0] == os.path.dirname(os.path.dirname(
        probe.__file__))


def test_a_chunk_hdf5_cannot_read_is_one_message(small, tmp_path):
    good, bad = tmp_path / "chunked.h5", tmp_path / "corrupt.h5"
    chunked_copy(small, good)
    chunked_copy(small, bad, corrupt_chunk=12)  # rows 120..129: not the first or last row
    env = dict(os.environ, MPINN_CACHE_DIR=str(tmp_path / "cache"))
    assert "all valid" in ok(mpinn(None, "data", "inspect", "--check", good, env=env)).stdout
    expect_error(mpinn(None, "data", "inspect", "--check", bad, env=env), 2, str(bad),
                 "HDF5 cannot read rows 0 to 300 of /train")
    # in training, the rank that reads the chunk tells all at that step: all exit 2
    result = mpinn(2, "train", bad, "--out", tmp_path / "run", "--hidden", "8", "--batch-size",
                   "40", "--epochs", "2", "--shuffle", "none", "--io", "independent", env=env)
    expect_error(result, 2, "cannot read rows 120 to 139 of /train/x", "probably corrupt",
                 "the 3 steps before it are saved")


def test_a_test_chunk_hdf5_cannot_read_ends_evaluate_on_all_ranks(small, tmp_path):
    good, bad = tmp_path / "chunked.h5", tmp_path / "corrupt.h5"
    chunked_copy(small, good)
    chunked_copy(small, bad, corrupt_chunk=2, split="test")  # test rows 20..29: rank 1's
    env = dict(os.environ, MPINN_CACHE_DIR=str(tmp_path / "cache"))
    ok(mpinn(1, "train", good, "--out", tmp_path / "run", "--hidden", "8", "--epochs", "0"))
    result = mpinn(2, "evaluate", tmp_path / "run", bad, "--io", "independent", env=env)
    expect_error(result, 2, "cannot read rows 20 to 39 of /test/x")
