"""The parts behind the failure guarantees, in-process (no mpiexec): the run directory's
lock, atomic writes on a full file system, strict JSON, the non-finite row check, and the
gradient sync's control slots on COMM_SELF and on a Dup() of it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from mpi4py import MPI

from conftest import mounted, root_only
from mpinn.base.errors import CollectiveError, StorageError, UsageError
from mpinn.base.files import strict_json, temp_path, write_atomically
from mpinn.comm import gradsync, inflight, world
from mpinn.nn.finite import nonfinite_row
from mpinn.nn.model import MLP, Architecture
from mpinn.perf import overlap
from mpinn.run import checkpoint
from mpinn.run.checkpoint import Checkpoint
from mpinn.run.lock import RunLock, break_stale
from mpinn.run.rundir import RunDir, tidy


@pytest.mark.fast
def test_flock_refuses_a_second_holder_and_names_the_first(tmp_path):
    first = RunLock(str(tmp_path)).acquire()
    assert first.method == "flock"
    with pytest.raises(UsageError, match=f"in use by the run of PID {os.getpid()} on host "
                                          f"{socket.gethostname()}"):
        RunLock(str(tmp_path)).acquire()
    first.release()
    RunLock(str(tmp_path)).acquire().release()  # free again once released


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_lock_file_refuses_a_live_holder_and_replaces_a_dead_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("MPINN_LOCK", "file")
    lock_file = tmp_path / ".lock.pid"
    first = RunLock(str(tmp_path)).acquire()
    assert first.method == "file" and f"pid={os.getpid()} " in lock_file.read_text()
    with pytest.raises(UsageError, match=f"in use by the run of PID {os.getpid()}"):
        RunLock(str(tmp_path)).acquire()
    first.release()
    assert not lock_file.exists()
    # a holder of this host that died (kill -9 leaves the file): stale, replaced
    lock_file.write_text(f"host={socket.gethostname()} pid={dead_pid()} start=1 since=x\n")
    RunLock(str(tmp_path)).acquire().release()
    # the PID reused by another process: its start time differs, so stale as well
    lock_file.write_text(f"host={socket.gethostname()} pid={os.getpid()} start=1 since=x\n")
    RunLock(str(tmp_path)).acquire().release()
    # a holder on another host cannot be checked from here: refused, with the way out
    lock_file.write_text("host=node-elsewhere pid=1 start=1 since=x\n")
    with pytest.raises(UsageError, match="PID 1 on host node-elsewhere.*remove .*lock.pid"):
        RunLock(str(tmp_path)).acquire()


def test_write_atomically_on_a_full_file_system_leaves_the_old_file(tmp_path):
    root_only("a small tmpfs (ENOSPC)")
    with mounted(tmp_path / "disk", "-t", "tmpfs", "-o", "size=64k", "tmpfs") as disk:
        (disk / "f").write_bytes(b"old")
        with pytest.raises(StorageError, match=r"cannot write .*/f: No space left on device "
                                               r"\(ENOSPC\); free space"):
            write_atomically(str(disk / "f"), b"x" * 200_000)
        assert (disk / "f").read_bytes() == b"old" and os.listdir(disk) == ["f"]
        write_atomically(str(disk / "f"), b"new")
        assert (disk / "f").read_bytes() == b"new" and os.listdir(disk) == ["f"]


@pytest.mark.fast
def test_tidy_removes_orphans_of_the_run_only_and_proves_writability(tmp_path):
    names = ("config.toml", "step-000000012.h5", ".lock", "a.tmp-x", ".step-000000012.h5.tmp-12",
             "checkpoint.h5.tmp-7", ".metrics.jsonl.tmp-3", ".predictions.h5.tmp-9")
    for name in names:
        (tmp_path / name).write_text("")
    assert os.path.basename(temp_path(str(tmp_path / "f"))) == f".f.tmp-{os.getpid()}"
    tidy(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [".lock", ".predictions.h5.tmp-9", "a.tmp-x",
                                            "config.toml", "step-000000012.h5"]


@pytest.mark.fast
def test_strict_json_has_no_nan():
    text = strict_json({"a": float("nan"), "b": [np.float64(np.inf), 1.5], "c": None})
    assert text == '{"a": null, "b": [null, 1.5], "c": null}'


@pytest.mark.fast
def test_nonfinite_row_finds_the_first_bad_row_only():
    x = np.ones((6, 3), np.float32)
    assert nonfinite_row(x) is None and nonfinite_row(x[:0]) is None
    x[4, 1], x[2, 0] = np.nan, -np.inf
    assert nonfinite_row(x) == 2
    huge = np.full((4, 3), 3e38, np.float32)  # finite, though their sum overflows
    assert nonfinite_row(huge) is None


@pytest.fixture(params=["self", "dup"])
def comm(request):
    world.start()  # importing mpinn.comm never starts MPI
    comm = MPI.COMM_SELF if request.param == "self" else MPI.COMM_SELF.Dup()
    yield comm
    if request.param == "dup":
        comm.Free()


@pytest.mark.fast
def test_the_sync_carries_gradients_losses_and_flags_in_one_buffer(comm):
    arch = Architecture((3, 4, 2), dtype="float32")
    sync = gradsync.GradientSync(comm, arch.n_params, arch.dtype)
    model = MLP(arch, 5, grads=sync.grads)
    assert np.shares_memory(model.grads, sync.buffer) and sync.buffer.size == arch.n_params + 3
    model.init(np.random.default_rng(0))
    model.forward(np.ones((5, 3), np.float32))
    loss = model.backward(np.array([0, 1, 0, 1, 1]))
    expected = model.grads.copy()
    sync.allreduce(loss, stop=True)
    assert sync.stop_requested and not sync.bad_input and sync.finite()
    assert sync.loss == pytest.approx(loss, rel=1e-6) and np.array_equal(sync.grads, expected)
    sync.allreduce(loss, bad_input=True)
    assert sync.bad_input and not sync.stop_requested
    sync.grads[7] = np.nan
    sync.allreduce(loss)
    assert not sync.finite()
    sync.grads[:] = 0
    sync.allreduce(np.inf)
    assert not sync.finite()
    with np.errstate(over="ignore"):
        sync.grads[:] = 1e20  # finite values whose squared norm overflows: divergence too
        sync.allreduce(1.0)
        assert not sync.finite()


@pytest.mark.fast
def test_a_successor_lock_file_is_not_removed_and_stale_ones_break_once(tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("MPINN_LOCK", "file")
    lock_file = tmp_path / ".lock.pid"
    holder = RunLock(str(tmp_path)).acquire()
    lock_file.unlink()  # as if judged stale by another run, which then took it
    lock_file.write_text("host=elsewhere pid=7 start=1 since=x\n")
    holder.release()
    assert lock_file.read_text().startswith("host=elsewhere")  # the successor's stays
    # of two runs that judged the same file stale, the second finds a new holder there
    break_stale(str(lock_file), "what the second run read before\n")
    assert lock_file.exists()
    break_stale(str(lock_file), lock_file.read_text())
    assert not lock_file.exists() and not (tmp_path / ".lock.pid.break").exists()


@pytest.mark.fast
def test_a_lock_file_run_and_a_flock_run_exclude_each_other(tmp_path, monkeypatch):
    monkeypatch.setenv("MPINN_LOCK", "file")
    holder = RunLock(str(tmp_path)).acquire()
    monkeypatch.setenv("MPINN_LOCK", "auto")
    with pytest.raises(UsageError, match="in use by"):
        RunLock(str(tmp_path)).acquire()
    holder.release()


@pytest.mark.fast
def test_a_requeued_job_replaces_the_lock_file_of_its_earlier_incarnation(tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("MPINN_LOCK", "file")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    (tmp_path / ".lock.pid").write_text("host=node-before pid=1 start=1 job=4242.0 since=x\n")
    RunLock(str(tmp_path)).acquire().release()
    # the same incarnation (another copy in the same job, e.g. srun of N singletons), or
    # another job: a live holder, to be respected
    for job in ("4242.1", "99.0"):
        (tmp_path / ".lock.pid").write_text(f"host=node-before pid=1 start=1 job={job} since=x\n")
        with pytest.raises(UsageError, match="on host node-before"):
            RunLock(str(tmp_path)).acquire()


@pytest.mark.fast
def test_a_checkpoint_with_a_nan_is_never_built():
    model = MLP(Architecture((3, 2)), 1)
    ckpt = Checkpoint(arch=model.arch, task="classification", step=7)
    assert checkpoint.image(ckpt, model).startswith(checkpoint.DIGEST_MAGIC)
    model.params[1] = np.nan
    with pytest.raises(CollectiveError, match="non-finite values at step 7"):
        checkpoint.image(ckpt, model)


@pytest.mark.fast
def test_pruning_keeps_the_newest_checkpoints_up_to_the_step_written(tmp_path):
    run = RunDir(str(tmp_path), keep_checkpoints=2)
    os.makedirs(run.history.folder)
    model = MLP(Architecture((3, 2)), 1)
    for step in (5, 10, 900):  # 900: left by a run killed before it pointed checkpoint.h5 at it
        image = checkpoint.image(Checkpoint(arch=model.arch, task="classification",
                                            step=step), model)
        (tmp_path / "checkpoints" / f"step-{step:09d}.h5").write_bytes(image)
    run.history.save(12, image)
    assert sorted(os.listdir(run.history.folder)) == ["step-000000010.h5", "step-000000012.h5"]
    assert os.path.samefile(tmp_path / "checkpoint.h5", tmp_path / "checkpoints" /
                            "step-000000012.h5")


def test_a_lock_file_of_a_live_process_is_respected_by_either_way(tmp_path, monkeypatch):
    """No flock held: only the lock file's holder check can refuse here."""
    from mpinn.run.lock import process_start
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        start = process_start(sleeper.pid)
        (tmp_path / ".lock.pid").write_text(f"host={socket.gethostname()} pid={sleeper.pid} "
                                            f"start={start} job=- since=x\n")
        for method in ("file", "auto"):
            monkeypatch.setenv("MPINN_LOCK", method)
            with pytest.raises(UsageError, match=f"in use by the run of PID {sleeper.pid}"):
                RunLock(str(tmp_path)).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    RunLock(str(tmp_path)).acquire().release()  # gone now: stale, replaced


@pytest.mark.fast
def test_an_unnamed_lock_file_is_stale_only_after_a_minute(tmp_path, monkeypatch):
    monkeypatch.setenv("MPINN_LOCK", "file")
    lock_file = tmp_path / ".lock.pid"
    lock_file.write_text("")  # a run killed between creating the file and naming itself
    with pytest.raises(UsageError, match="has not written its name yet"):
        RunLock(str(tmp_path)).acquire()
    os.utime(lock_file, (0, 0))
    RunLock(str(tmp_path)).acquire().release()


@pytest.mark.fast
@pytest.mark.parametrize("mode,bucket_bytes", [("overlap", 1000), ("overlap", 1 << 20),
                                               ("blocking", 1000)])
def test_the_buckets_tile_the_buffer_from_its_end(comm, mode, bucket_bytes):
    """Backward's hooks make the sync send slices that tile the buffer, last layer first,
    the control slots with the first; the reduced buffer is the blocking one's."""
    arch = Architecture((40, 64, 32, 3), dtype="float64")
    sync = gradsync.GradientSync(comm, arch.n_params, arch.dtype, mode, bucket_bytes)
    model = MLP(arch, 50, grads=sync.grads)
    model.init(np.random.default_rng(1))
    rng = np.random.default_rng(2)
    model.forward(rng.standard_normal((50, 40)))
    y = rng.integers(0, 3, 50)
    expected = MLP(arch, 50)  # the same gradient without hooks
    expected.params[:] = model.params
    expected.forward(model._acts[0][:50].copy())
    expected.backward(y)
    sync.start(model.loss(y), stop=True)
    model.backprop(hooks=sync)
    sync.finish()
    assert np.array_equal(sync.grads, expected.grads) and sync.stop_requested
    edges = sorted(sync.buckets)
    assert edges[0][0] == 0 and edges[-1][1] == sync.buffer.size  # the control slots too
    assert all(a[1] == b[0] for a, b in zip(edges, edges[1:]))  # contiguous, no overlap
    assert sync.buckets == sorted(sync.buckets, reverse=True)  # sent from the end
    if mode == "blocking" or bucket_bytes > sync.buffer.nbytes:
        assert len(sync.buckets) == 1
    else:  # every bucket but the last (the rest) holds at least bucket_bytes
        assert len(sync.buckets) >= 3
        assert all((hi - lo) * 8 >= bucket_bytes for lo, hi in sync.buckets[:-1])


@pytest.mark.fast
def test_a_panel_in_the_worker_is_tested_while_something_is_in_flight():
    """PanelRunner tests TESTS times a wake-up while test() says something is in flight,
    stops once it says nothing is (until the next panel), tests once after the panel, and
    raises the panel's error after the panel ended, also when a test fails."""
    runner, calls, ended = inflight.PanelRunner(), [], []

    def panel(seconds: float, fail: bool = False):
        def work():
            time.sleep(seconds)
            ended.append(True)
            if fail:
                raise ValueError("the panel failed")
        return work

    runner.run(panel(0.05), lambda: calls.append(1) or True)
    assert len(calls) >= 2 * inflight.TESTS + 1 and len(calls) % inflight.TESTS == 1
    calls.clear()
    runner.run(panel(0.05), lambda: calls.append(1) or False)
    assert len(calls) == 2  # one wake-up, then nothing until the panel ended
    with pytest.raises(ValueError, match="the panel failed"):
        runner.run(panel(0.01, fail=True), lambda: True)

    def failing_test():
        raise RuntimeError("MPI_Test failed")
    ended.clear()
    with pytest.raises(RuntimeError, match="MPI_Test failed"):
        runner.run(panel(0.05), failing_test)
    assert ended == [True]  # the panel ran to its end before the error left


@pytest.mark.fast
@pytest.mark.parametrize("bucket_bytes", [1000, 300_000, 1 << 20])
def test_the_cost_model_sends_the_buckets_the_sync_sends(comm, bucket_bytes):
    """perf/overlap.py's schedule, from the shapes alone, names the buckets GradientSync
    makes of backward's panels (here several per layer): the same bytes, in order."""
    arch = Architecture((300, 500, 400, 3), dtype="float64")
    sync = gradsync.GradientSync(comm, arch.n_params, arch.dtype, "overlap", bucket_bytes)
    model = MLP(arch, 300, grads=sync.grads)
    model.init(np.random.default_rng(1))
    rng = np.random.default_rng(2)
    model.forward(rng.standard_normal((300, 300)))
    sync.start(model.loss(rng.integers(0, 3, 300)))
    model.backprop(hooks=sync)
    sync.finish()
    sent = [(hi - lo) * 8 for lo, hi in sync.buckets]
    assert len(sent) >= 2
    assert sent == [nbytes for nbytes, _ in overlap.bucket_schedule(list(arch.sizes), 8,
                                                                     bucket_bytes)]


@pytest.mark.fast
@pytest.mark.parametrize("mode, reproducible", [("overlap", False), ("blocking", False),
                                                ("overlap", True)])
def test_a_step_allocates_nothing_of_layer_size(comm, mode, reproducible):
    """After the first step, a training step allocates less than 64 KiB in NumPy's
    domain (no array of a layer's or the parameters' size); --reproducible's too."""
    import tracemalloc

    from mpinn.data.feed import Batch
    from mpinn.data.layout import DatasetInfo, Problem
    from mpinn.nn.fixed import Budget
    from mpinn.nn.optim import make_optimizer
    from mpinn.train.session import build_model
    from mpinn.train.step import Learner, train_step
    from mpinn.train.timing import PhaseTimer
    # (--reproducible's model here is float64, where NumPy's ufuncs (the bias's broadcast
    # add, also without --reproducible) use a buffer of np.getbufsize() float64 values:
    # 64 KiB, whatever the layers, still well below a layer's 256 KiB here)
    arch = Architecture((64, 256, 256, 10), dtype="float64" if reproducible else "float32")
    sync = gradsync.GradientSync(comm, arch.n_params, arch.dtype, mode, 100_000,
                                 exact=6 if reproducible else 0)
    model = build_model(arch, 128, sync, Budget.plan(arch.sizes, 128) if reproducible
                        else None)
    model.init(np.random.default_rng(0))
    learner = Learner(model, make_optimizer("adam", model.params, 1e-3, 0.0, 0.9), sync,
                      Problem(DatasetInfo("(in memory)", 128, 0, 64, "classification", 10),
                              10), clip_norm=1.0 if reproducible else 0.0)
    rng = np.random.default_rng(1)
    batch = Batch.in_memory(rng.standard_normal((128, 64)).astype(arch.dtype),  # (no cast)
                            rng.integers(0, 10, 128).astype(np.int32), 128)
    timer = PhaseTimer()
    for _ in range(2):
        train_step(learner, batch, timer)
    tracemalloc.start()
    try:
        train_step(learner, batch, timer)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    ufunc_buffer = np.getbufsize() * 8 if reproducible else 0
    assert peak < 64 * 1024 + ufunc_buffer, peak
    assert len(sync.buckets) > (1 if mode == "overlap" else 0)
