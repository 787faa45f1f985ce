"""Scaling studies: `mpinn scaling run` launches real mpiexec jobs, one per point;
`mpinn scaling report` turns their summary.json files into points.csv, report.md and
plots. Oracle: the figures recomputed here from the summaries, and closed forms."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (
    MPI_NOT_STARTED,
    child_env,
    expect_error,
    finish,
    mounted,
    mpiexec,
    mpinn,
    ok,
    root_only,
    run,
    start,
    text_of,
    unavailable,
)
from mpinn.base.errors import UsageError
from mpinn.perf import costmodel, report, scaling
from mpinn.run.config import TrainConfig

PHASES = ("data", "forward", "backward", "allreduce", "update", "allgather")
COLUMNS = ["mode", "ranks", "hosts", "ranks_per_host", "repeats", "oversubscribed",
           "global_batch", "samples_per_s", "samples_per_s_min", "samples_per_s_max", "step_s",
           "data_s", "forward_s", "backward_s", "allreduce_s", "update_s", "allgather_s",
           "sync_s",
           "sync_exposed_s", "imbalance_s",
           "speedup", "efficiency", "karp_flatt", "predicted_step_s", "prediction_error"]
TRAIN = ("--hidden", "8", "--batch-size", "30", "--epochs", "1", "--progress", "off")


def sweep(data: Path, out: Path, *options, timeout: float = 300, env=None,
          prefix: tuple = (), calibrate: bool = False) -> subprocess.CompletedProcess:
    """`mpinn scaling run`; without the cost model's benchmarks unless calibrate."""
    cmd = [*prefix, sys.executable, "-m", "mpinn", "scaling", "run", data, "--out", out,
           *TRAIN, *options, *(() if calibrate else ("--no-calibrate",))]
    return run(cmd, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def study(synth, tmp_path_factory) -> tuple[Path, Path]:
    """P = 1, 2, strong and weak, 2 repeats, with the default launcher; and its report."""
    root = tmp_path_factory.mktemp("study")
    ok(sweep(synth, root / "sweep", "--ranks", "1,2", "--mode", "both", "--repeats", "2",
             calibrate=True))
    ok(mpinn(None, "scaling", "report", root / "sweep", "--out", root / "report"))
    return root / "sweep", root / "report"


def summaries(sweep_dir: Path) -> dict[tuple[str, int], list[dict]]:
    found: dict[tuple[str, int], list[dict]] = {}
    for path in sorted(sweep_dir.glob("*/p*-r*/summary.json")):
        mode, ranks = path.parent.parent.name, int(path.parent.name[1:].split("-")[0])
        found.setdefault((mode, ranks), []).append(json.loads(path.read_text()))
    return found


def read_points(report_dir: Path) -> list[dict]:
    with open(report_dir / "points.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        return list(reader)


def test_sweep_writes_one_run_directory_per_point_and_a_manifest(study, synth):
    sweep_dir, _ = study
    manifest = json.loads((sweep_dir / "sweep.json").read_text())
    assert manifest["mode"] == "both" and manifest["ranks"] == [1, 2]
    assert manifest["repeats"] == 2 and "-n {n}" in manifest["launcher"]
    assert manifest["dataset"]["path"] == str(synth) and manifest["dataset"]["train_rows"] == 600
    assert manifest["train_config"]["hidden"] == [8] and manifest["mpinn_version"]
    names = {f"{m}/p{n}-r{k}" for m in ("strong", "weak") for n in (1, 2) for k in (0, 1)}
    assert {p["name"] for p in manifest["points"]} == names
    assert all(p["state"] == "done" and p["exit_code"] == 0 and p["oversubscribed"] is False
               for p in manifest["points"])
    for name in names:
        assert (sweep_dir / name / "summary.json").exists() and (sweep_dir / f"{name}.log").exists()
    found = summaries(sweep_dir)
    for (mode, ranks), runs in found.items():
        for s in runs:  # strong keeps the global batch; weak the batch per rank, lr x ranks
            assert s["ranks"] == ranks
            assert s["batch_size"] == 30 * (ranks if mode == "weak" else 1)
            assert s["lr"] == pytest.approx(0.01 * (ranks if mode == "weak" else 1), rel=1e-12)
            assert s["oversubscribed"] is False
    point = next(p for p in manifest["points"] if p["name"] == "weak/p2-r1")
    assert point["lr_scaling"] == "linear" and point["base_batch"] == 30 and point["lr"] == 0.02
    log = (sweep_dir / "weak" / "p2-r0.log").read_text()  # the model line: the rate used
    model_line = next(line for line in log.splitlines() if line.startswith("model "))
    assert " lr 0.02;" in model_line and "0.01" not in model_line


def test_points_csv_is_recomputed_from_the_summaries(study):
    sweep_dir, report_dir = study
    rows = {(r["mode"], int(r["ranks"])): r for r in read_points(report_dir)}
    found = summaries(sweep_dir)
    assert set(rows) == set(found)
    for (mode, ranks), runs in found.items():
        row = rows[mode, ranks]
        rates = [s["samples_per_s"] for s in runs]
        base = statistics.fmean(s["samples_per_s"] for s in found[mode, 1])
        speedup = statistics.fmean(rates) / base
        expected = {
            "samples_per_s": statistics.fmean(rates), "samples_per_s_min": min(rates),
            "samples_per_s_max": max(rates),
            "step_s": statistics.fmean(s["step_s"]["mean"] for s in runs),
            # (the all-gather is a phase of sharded runs alone: 0 in the columns here)
            **{f"{p}_s": statistics.fmean(s["step_time_s"].get(p, {"mean": 0})["mean"]
                                          for s in runs) for p in PHASES},
            "imbalance_s": statistics.fmean(
                statistics.fmean(s["step_time_s"][p]["max"] - s["step_time_s"][p]["mean"]
                                 for p in PHASES if p in s["step_time_s"]) for s in runs),
            "speedup": speedup, "efficiency": speedup / ranks}
        for column, value in expected.items():
            assert float(row[column]) == pytest.approx(value, rel=1e-12, abs=1e-15), column
        assert row["karp_flatt"] == ("" if mode == "weak" or ranks == 1 else row["karp_flatt"])
        if mode == "strong" and ranks > 1:
            assert float(row["karp_flatt"]) == pytest.approx(
                (1 / speedup - 1 / ranks) / (1 - 1 / ranks), rel=1e-12)
        assert (row["hosts"], row["ranks_per_host"], row["repeats"]) == ("1", str(ranks), "2")
        assert row["oversubscribed"] == "false"
        assert int(row["global_batch"]) == 30 * (ranks if mode == "weak" else 1)
    assert rows["strong", 1]["speedup"] == "1.0" and rows["weak", 1]["efficiency"] == "1.0"


def test_plots_are_valid_images(study):
    try:
        import matplotlib.image as matplotlib_image
    except ImportError:  # fails under CI=true: the plot extra is part of make install
        unavailable("matplotlib", "pip install 'mpinn[plot]'")
    _, report_dir = study
    for name in ("throughput", "efficiency", "phases"):
        path = report_dir / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width = matplotlib_image.imread(path).shape[:2]
        assert height > 200 and width > 300


def test_report_md_lists_every_point_and_the_environment(study):
    sweep_dir, report_dir = study
    text = (report_dir / "report.md").read_text()
    for path in sweep_dir.glob("*/p*-r*"):
        if path.is_dir():
            assert f"`{sweep_dir / path.parent.name / path.name}`" in text, path
    for heading in ("## Strong scaling (global batch 30)", "## Weak scaling (30 rows per rank)",
                    "## Every run", "## Environment"):
        assert heading in text
    for word in ("**MPI**: MPICH", "**BLAS**", "1 thread(s) per rank", "**hosts**",
                 "**model**: 12-8-4", "**optimizer**: momentum", "600 training rows",
                 "![throughput](throughput.png)"):
        assert word in text, word


def test_the_same_command_again_keeps_finished_points(synth, tmp_path):
    out = tmp_path / "sweep"
    ok(sweep(synth, out, "--ranks", "1", "--mode", "strong"))
    kept = (out / "strong" / "p1-r0" / "summary.json").stat().st_mtime_ns
    again = ok(sweep(synth, out, "--ranks", "1", "--mode", "strong", "--repeats", "2"))
    assert "strong/p1-r0: finished before, kept" in again.stdout
    assert "[2/2] strong/p1-r1: 1 rank" in again.stdout
    assert (out / "strong" / "p1-r0" / "summary.json").stat().st_mtime_ns == kept
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["repeats"] == 2 and len(manifest["points"]) == 2
    other = sweep(synth, out, "--ranks", "1", "--mode", "strong", "--lr", "0.5")
    expect_error(other, 2, "holds a sweep with other settings", "train_config", "--overwrite")
    ok(sweep(synth, out, "--ranks", "1", "--mode", "strong", "--lr", "0.5", "--overwrite"))
    assert not (out / "strong" / "p1-r1").exists()


def test_launch_variables_do_not_reach_the_trainings(synth, tmp_path):
    """A driver started inside another job's environment launches clean jobs: with
    OMPI_COMM_WORLD_SIZE=4 left in, the training would be refused as a lone copy."""
    dump = tmp_path / "env.txt"
    wrapper = tmp_path / "launcher.sh"
    wrapper.write_text(f'#!/bin/sh\nenv > "{dump}"\nexec "{mpiexec()}" "$@"\n')
    wrapper.chmod(0o755)
    env = dict(child_env(), PMI_RANK="0", PMI_SIZE="4", PMIX_RANK="0",
               OMPI_COMM_WORLD_SIZE="4", OMPI_MCA_btl="self", OMPI_ALLOW_RUN_AS_ROOT="1")
    ok(sweep(synth, tmp_path / "sweep", "--ranks", "1", "--mode", "strong",
             "--launcher", f"{wrapper} -n {{n}}", env=env))
    seen = dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)
    assert not {"PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE"} & set(seen)
    assert seen["OMPI_MCA_btl"] == "self" and seen["OMPI_ALLOW_RUN_AS_ROOT"] == "1"
    assert seen["MPINN_OVERSUBSCRIBE"] == "error"


def test_oversubscribed_points_are_refused_before_anything_runs(synth, tmp_path):
    out = tmp_path / "sweep"
    result = sweep(synth, out, "--ranks", "1,2", prefix=("taskset", "-c", "0"))
    expect_error(result, 2, "2 ranks x 1 BLAS thread", "1 CPUs", "--oversubscribe")
    assert not out.exists()


def test_oversubscribed_points_run_when_asked_and_are_flagged(synth, tmp_path):
    out = tmp_path / "sweep"
    ok(sweep(synth, out, "--ranks", "2", "--mode", "strong", "--oversubscribe",
             prefix=("taskset", "-c", "0")))
    assert json.loads((out / "strong" / "p2-r0" / "summary.json").read_text())["oversubscribed"]
    assert json.loads((out / "sweep.json").read_text())["points"][0]["oversubscribed"] is True
    ok(mpinn(None, "scaling", "report", out, "--out", tmp_path / "report"))
    assert read_points(tmp_path / "report")[0]["oversubscribed"] == "true"
    assert "| 2 (oversubscribed) |" in (tmp_path / "report" / "report.md").read_text()


def test_with_another_launcher_the_ranks_refuse_to_oversubscribe(synth, tmp_path):
    out = tmp_path / "sweep"
    result = sweep(synth, out, "--ranks", "2", "--mode", "strong",
                   "--launcher", f"{mpiexec()} -n {{n}}", prefix=("taskset", "-c", "0"))
    assert result.returncode == 2, text_of(result)
    assert "oversubscribed, and MPINN_OVERSUBSCRIBE=error" in result.stdout
    assert "1 point(s) refused to run (exit 2; see their logs): strong/p2-r0" in result.stdout
    point = json.loads((out / "sweep.json").read_text())["points"][0]
    assert point["state"] == "refused" and point["exit_code"] == 2


def test_a_refused_point_leaves_the_others_running(synth, tmp_path):
    """On one CPU, with a launcher the driver cannot check: the 2-rank benchmark and
    points refuse, the 1-rank ones run, and the report has them."""
    out = tmp_path / "sweep"
    result = sweep(synth, out, "--ranks", "1,2", "--launcher", f"{mpiexec()} -n {{n}}",
                   prefix=("taskset", "-c", "0"), calibrate=True)
    assert result.returncode == 2, text_of(result)
    assert "calibration/step-p2.json refused to run" in result.stdout
    states = {p["name"]: p["state"] for p in
              json.loads((out / "sweep.json").read_text())["points"]}
    assert states == {"strong/p1-r0": "done", "strong/p2-r0": "refused",
                      "weak/p1-r0": "done", "weak/p2-r0": "refused"}
    ok(mpinn(None, "scaling", "report", out, "--out", tmp_path / "report"))
    rows = read_points(tmp_path / "report")
    assert [(r["mode"], r["ranks"]) for r in rows] == [("strong", "1"), ("weak", "1")]
    assert all(r["predicted_step_s"] for r in rows)
    text = (tmp_path / "report" / "report.md").read_text()
    assert "strong/p2-r0 (refused)" in text


def test_points_that_would_time_no_step_are_refused_first(synth, tmp_path):
    result = sweep(synth, tmp_path / "sweep", "--ranks", "1,2", "--batch-size", "400")
    expect_error(result, 2, "weak/p2-r0", "1 step(s)", "--epochs")
    assert not (tmp_path / "sweep" / "sweep.json").exists()


def test_sweeps_that_did_the_same_work_report_together(synth, tmp_path):
    """Two sweeps that differ in how they report (--progress), not in their work: one
    report, the rows of both; the same sweep named twice counts once."""
    ok(sweep(synth, tmp_path / "a", "--ranks", "1", "--mode", "strong"))
    ok(sweep(synth, tmp_path / "b", "--ranks", "1", "--mode", "strong", "--progress", "lines"))
    ok(mpinn(None, "scaling", "report", tmp_path / "a", tmp_path / "b", f"{tmp_path / 'a'}/",
             "--out", tmp_path / "report"))
    assert read_points(tmp_path / "report")[0]["repeats"] == "2"
    ok(sweep(synth, tmp_path / "c", "--ranks", "1", "--mode", "strong", "--hidden", "6"))
    expect_error(mpinn(None, "scaling", "report", tmp_path / "a", tmp_path / "c", "--out",
                       tmp_path / "r2"), 2, "differ in their training", "hidden")


def test_a_signal_stops_the_running_point_and_the_sweep_continues_later(synth, tmp_path):
    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "mpinn", "scaling", "run", synth, "--out", out,
            "--ranks", "1,2", "--mode", "strong", "--hidden", "8", "--batch-size", "2",
            "--epochs", "40", "--progress", "off"]
    proc = start(args)
    log = out / "strong" / "p1-r0.log"
    deadline = time.monotonic() + 60
    while not (log.exists() and "epoch 1/40" in log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, finish(proc)
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    result = finish(proc, timeout=60)
    assert result.returncode == 3, text_of(result)
    assert "stopped at strong/p1-r0" in result.stdout and "run the same command" in result.stdout
    manifest = json.loads((out / "sweep.json").read_text())
    assert [p["state"] for p in manifest["points"]] == ["stopped", "pending"]
    assert (out / "strong" / "p1-r0" / "checkpoint.h5").exists()


@pytest.mark.parametrize("options,words", [
    (("--ranks", "0"), ["--ranks", ">= 1"]),
    (("--ranks", "one,2"), ["--ranks", "rank counts like 1,2,4"]),
    (("--repeats", "0"), ["--repeats must be >= 1"]),
    (("--launcher", "mpiexec -n 2"), ["has no {n}"]),
    (("--launcher", "'unclosed {n}"), ["--launcher", "quotation"]),
    (("--mode", "medium"), ["invalid choice", "both"]),
    (("--hidden", "x"), ["hidden"]),
    (("--accumulate", "40"), ["accumulate"]),
    (("--lr-scaling", "linear"), ["base_batch"]),
])
@pytest.mark.fast
def test_bad_sweeps_are_refused_with_one_message(cli, synth, tmp_path, options, words):
    expect_error(cli("scaling", "run", synth, "--out", tmp_path / "sweep", *TRAIN,
                     "--ranks", "1", *options), 2, *words)
    assert not (tmp_path / "sweep" / "sweep.json").exists()


@pytest.mark.fast
def test_a_missing_dataset_or_sweep_is_one_message(cli, tmp_path):
    expect_error(cli("scaling", "run", tmp_path / "none.h5", "--out", tmp_path / "sweep",
                     "--ranks", "1"), 2, "none.h5")
    expect_error(cli("scaling", "report", tmp_path, "--out", tmp_path / "r"), 2,
                 "holds no sweep.json")


def test_a_report_on_a_full_disk_is_one_message(study, tmp_path):
    root_only("a small tmpfs (ENOSPC)")
    sweep_dir, _ = study
    with mounted(tmp_path / "disk", "-t", "tmpfs", "-o", "size=8k", "tmpfs") as disk:
        result = mpinn(None, "scaling", "report", sweep_dir, "--out", disk / "report")
        expect_error(result, 1, "No space left on device (ENOSPC)", str(disk / "report"))
        assert not [p for p in disk.rglob("*") if ".tmp-" in p.name]  # whole files only


def test_report_without_matplotlib_writes_the_tables(study, tmp_path):
    sweep_dir, _ = study
    fake = tmp_path / "fake" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(fake.parent), env.get("PYTHONPATH", "")])
    result = ok(run([sys.executable, "-m", "mpinn", "scaling", "report", sweep_dir,
                     "--out", tmp_path / "report"], env=env))
    assert "pip install 'mpinn[plot]'" in result.stdout
    assert (tmp_path / "report" / "points.csv").exists()
    assert "No plots:" in (tmp_path / "report" / "report.md").read_text()
    assert not list((tmp_path / "report").glob("*.png"))


# in-process: the pieces, against closed forms

def fake_run(mode: str, ranks: int, rate: float, repeat: int = 0) -> report.Run:
    phases = {p: {"mean": 0.001 * (i + 1), "max": 0.001 * (i + 1) + 0.0005 * (ranks - 1)}
              for i, p in enumerate(PHASES)}
    summary = {"samples_per_s": rate, "batch_size": 64 * (ranks if mode == "weak" else 1),
               "hosts": ["a", "b"][:1 + (ranks > 2)], "ranks_per_host": [min(ranks, 2)] * 2,
               "step_s": {"mean": 0.02, "max": 0.03}, "step_time_s": phases, "steps": 50}
    return report.Run(mode, ranks, repeat, f"{mode}/p{ranks}", summary, "s")


@pytest.mark.fast
def test_speedup_efficiency_and_karp_flatt_follow_their_definitions():
    rows = report.points([fake_run("strong", 1, 100.0), fake_run("strong", 2, 150.0),
                          fake_run("strong", 4, 200.0), fake_run("strong", 4, 240.0, 1),
                          fake_run("weak", 2, 180.0), fake_run("weak", 4, 300.0)])
    strong = {r["ranks"]: r for r in rows if r["mode"] == "strong"}
    assert strong[2]["speedup"] == 1.5 and strong[2]["efficiency"] == 0.75
    assert strong[2]["karp_flatt"] == pytest.approx(1 / 3)  # (1/1.5 - 1/2) / (1 - 1/2)
    assert strong[4]["samples_per_s"] == 220.0 and strong[4]["repeats"] == 2
    assert strong[4]["speedup"] == 2.2 and strong[4]["karp_flatt"] == pytest.approx(
        (1 / 2.2 - 0.25) / 0.75)
    assert strong[4]["hosts"] == 2 and strong[4]["imbalance_s"] == pytest.approx(0.0015)
    replicated = fake_run("strong", 4, 200.0)  # no --shard-optimizer: no all-gather, and
    replicated.summary["step_time_s"]["allgather"] = {"mean": 0.0, "max": 0.0}  # no share
    assert report.points([replicated])[0]["imbalance_s"] == pytest.approx(0.0015)
    weak = {r["ranks"]: r for r in rows if r["mode"] == "weak"}  # no P = 1: relative to P = 2
    assert weak[2]["speedup"] == 2.0 and weak[4]["speedup"] == pytest.approx(2 * 300 / 180)
    assert weak[4]["karp_flatt"] is None and weak[4]["efficiency"] == pytest.approx(300 / 360)


@pytest.mark.fast
def test_weak_points_scale_the_learning_rate_unless_told_otherwise():
    cfg = TrainConfig(data="d.h5", out="o", lr=0.1, batch_size=32)
    points = scaling.plan(cfg, ("strong", "weak"), (1, 4), 1, scaling_given=False)
    assert [(p.mode, p.ranks, p.batch_size, p.lr) for p in points] == [
        ("strong", 1, 32, 0.1), ("strong", 4, 32, 0.1), ("weak", 1, 32, 0.1),
        ("weak", 4, 128, pytest.approx(0.4))]
    kept = scaling.plan(cfg, ("weak",), (4,), 2, scaling_given=True)
    assert [(p.lr_scaling, p.lr, p.repeat) for p in kept] == [("none", 0.1, 0), ("none", 0.1, 1)]


@pytest.mark.fast
def test_launcher_templates_and_environment():
    os.environ["MPINN_TEST_LAB"] = "/lab dir"
    try:
        assert scaling.launcher_argv("$MPINN_TEST_LAB/mpiexec -n {n} -ppn 1", 4) == \
            ["/lab", "dir/mpiexec", "-n", "4", "-ppn", "1"]
        assert scaling.launcher_argv("'$MPINN_TEST_LAB/mpiexec' --ntasks={n}", 2) == \
            ["/lab dir/mpiexec", "--ntasks=2"]
    finally:
        del os.environ["MPINN_TEST_LAB"]
    with pytest.raises(UsageError, match="no {n}"):
        scaling.launcher_argv("srun", 2)
    env = scaling.child_environment({"PMI_FD": "3", "PMIX_NAMESPACE": "x", "OMPI_MCA_pml": "ob1",
                                     "OMPI_COMM_WORLD_RANK": "1", "PATH": "/bin"}, True)
    assert env == {"OMPI_MCA_pml": "ob1", "PATH": "/bin", "MPINN_OVERSUBSCRIBE": "warn"}
    assert scaling.parse_ranks("4,1,2,2") == (1, 2, 4) and scaling.default_ranks(6) == (1, 2, 4, 6)


def test_the_driver_and_the_report_never_start_mpi():
    code = ("import sys, mpinn.cli.main, mpinn.perf.scaling, mpinn.perf.sweep, mpinn.perf.report, "
            "mpinn.perf.plot, mpinn.perf.projection, mpinn.perf.calibrate, mpinn.perf.costmodel\n"
            + MPI_NOT_STARTED)
    ok(run([sys.executable, "-c", code]))
    assert report.COLUMNS == tuple(COLUMNS)  # points.csv's columns are a contract


# the cost model in the report, and the projection

def test_the_sweep_calibrates_and_the_report_predicts_every_point(study):
    sweep_dir, report_dir = study
    calibration = sweep_dir / "calibration"
    steps = {n: json.loads((calibration / f"step-p{n}.json").read_text()) for n in (1, 2)}
    comm = json.loads((calibration / "comm.json").read_text())
    assert steps[2]["ranks"] == 2 and steps[2]["model"] == [12, 8, 4]
    assert steps[1]["optimizer"] == "momentum" and "compute_fit" in steps[1]
    assert comm["ranks"] == 2 and comm["transports"]["shm"]["alpha_s"] > 0
    found = summaries(sweep_dir)
    for row in read_points(report_dir):
        ranks = int(row["ranks"])
        n_bytes = found[row["mode"], ranks][0]["allreduce_bytes_per_step"]
        assert n_bytes == (12 * 8 + 8 + 8 * 4 + 4 + 3) * 4  # weights, biases, 3 control slots
        expected = costmodel.predict_step(steps[ranks], comm, int(row["global_batch"]), ranks,
                                          1, ranks, n_bytes)["step_s"]
        assert float(row["predicted_step_s"]) == pytest.approx(expected, rel=1e-12)
        assert float(row["prediction_error"]) == pytest.approx(
            expected / float(row["step_s"]) - 1, rel=1e-9)
    text = (report_dir / "report.md").read_text()
    assert "## Predicted against measured" in text and "## Projection" in text
    assert "| weak | 4096 | 2048 |" in text and "![projection](projection.png)" in text
    assert "| strong | 16 | 8 |" in text and "| strong | 32 |" not in text  # batch of 30
    for name in ("prediction", "projection"):
        assert (report_dir / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


BENCH_STEP = {"model": [100, 50, 10], "dtype": "float32", "ranks": 1, "batch_size": 64,
              "optimizer": "sgd",
              "step_time_s": {p: {"mean": t, "max": t} for p, t in
                              (("data", 0.0), ("forward", 0.0136), ("backward", 0.0204),
                               ("allreduce", 0.0), ("update", 0.004))},
              "compute_fit": {"c0_s": 0.002, "c1_s_per_row": 0.0005, "backward_fraction": 0.6}}


@pytest.mark.fast
def test_project_follows_the_closed_forms(cli, tmp_path):
    """One rank per node, P = 2: Rabenseifner's 2 (alpha + n/2 beta) + n/2 gamma."""
    bench = tmp_path / "step.json"
    bench.write_text(json.dumps(BENCH_STEP))
    alpha, beta, gamma = 1e-5, 1e-9, 1e-10
    ok(cli("scaling", "project", "--alpha", alpha, "--beta", beta, "--gamma", gamma,
           "--bench-step", bench, "--global-batch", 64, "--max-ranks", 8, "--out",
           tmp_path / "out"))
    with open(tmp_path / "out" / "projection.csv", newline="") as f:
        rows = {(r["mode"], int(r["ranks"])): r for r in csv.DictReader(f)}
    n = (100 * 50 + 50 + 50 * 10 + 10 + 3) * 4
    compute = {b: 0.002 + 0.0005 * b for b in (64, 32, 8)}
    t1 = compute[64] + 0.004
    t2 = compute[32] + 0.004 + 2 * (alpha + n / 2 * beta) + n / 2 * gamma
    assert float(rows["strong", 1]["step_s"]) == pytest.approx(t1, rel=1e-12)
    assert float(rows["strong", 2]["step_s"]) == pytest.approx(t2, rel=1e-12)
    assert float(rows["strong", 2]["efficiency"]) == pytest.approx(t1 / (2 * t2), rel=1e-12)
    weak2 = compute[64] + 0.004 + 2 * (alpha + n / 2 * beta) + n / 2 * gamma
    assert float(rows["weak", 2]["efficiency"]) == pytest.approx(t1 / weak2, rel=1e-12)
    # --sync overlap: the 22 kB of gradients are one bucket (< 1 MB), ready when backward
    # ends, so nothing hides behind backward
    assert float(rows["strong", 2]["step_overlap_s"]) == pytest.approx(t2, rel=1e-12)
    assert [p for m, p in rows if m == "strong"] == [1, 2, 4, 8]
    text = (tmp_path / "out" / "projection.md").read_text()
    assert "| strong | 8 | 8 |" in text
    assert "**Links: network as described to mpinn scaling project.**" in text
    assert "- network: alpha 10 us, beta 1,000 ps/B, as described" in text


def test_project_measures_the_compute_here_without_a_bench_step(cli, tmp_path):
    result = ok(cli("scaling", "project", "--alpha", 2e-5, "--beta", 1e-9,
                    "--features", 8, "--hidden", 8, "--classes", 2, "--global-batch", 16,
                    "--ranks-per-node", 2, "--max-ranks", 16, "--out", tmp_path / "out"))
    bench = json.loads((tmp_path / "out" / "bench-step.json").read_text())
    assert bench["model"] == [8, 8, 2] and bench["compute_fit"]["local_batches"] == [1, 4, 16]
    assert "| weak | 16 | 8 |" in result.stdout


@pytest.mark.parametrize("options,words", [
    ((), ["--alpha", "--beta"]),
    (("--alpha", "1e-6", "--beta", "-1"), ["beta > 0"]),
    (("--alpha", "1e-6", "--beta", "1e-9", "--ranks-per-node", "0"), [">= 1"]),
    (("--alpha", "1e-6", "--beta", "1e-9", "--bench-step", "/nonexistent.json"),
     ["/nonexistent.json"]),
])
@pytest.mark.fast
def test_bad_projections_are_refused_with_one_message(cli, tmp_path, options, words):
    expect_error(cli("scaling", "project", *options, "--out", tmp_path / "o"), 2, *words)


# the report's warnings and labels, from sweeps written here (no process runs): a
# manifest as the driver makes it, summaries with the fields the runs write, and a
# calibration whose predictions set the measured steps (so the errors are known)

DATASET = {"path": "/data/synth.h5", "train_rows": 600, "test_rows": 100, "features": 12,
           "task": "classification", "outputs": 4}
N_BYTES = (12 * 8 + 8 + 8 * 4 + 4 + 3) * 4  # 12-8-4 and the 3 control slots, float32
ONE_HOST_COMM = {"ranks": 2, "hosts": ["vm"], "ranks_per_host": [2], "gamma_s_per_byte": 3e-11,
                 "transports": {"shm": {"alpha_s": 4e-6, "beta_s_per_byte": 2e-10,
                                        "pair": [0, 1], "exchange": {
                                            "alpha_s": 5e-6, "beta_s_per_byte": 3e-10}}}}
TWO_HOST_COMM = {"ranks": 2, "hosts": ["a", "b"], "ranks_per_host": [1, 1],
                 "gamma_s_per_byte": 3e-11,
                 "transports": {"net": {"alpha_s": 20e-6, "beta_s_per_byte": 7e-10,
                                        "pair": [0, 1], "exchange": {
                                            "alpha_s": 25e-6, "beta_s_per_byte": 8e-10}}}}


def bench_step(ranks: int) -> dict:
    return dict(BENCH_STEP, model=[12, 8, 4], ranks=ranks, batch_size=30, optimizer="momentum")


def written_sweep(root: Path, ranks=(1, 2), modes=("strong",), repeats=1, steps=100,
                  hosts=1, comm: dict | None = None, errors: dict | None = None,
                  rates: dict | None = None) -> Path:
    """A finished sweep on disk. With comm, a calibration: each point's step is then
    measured at predicted / (1 + error) (errors: (mode, ranks) -> error, default 0);
    without, step = global batch / rate (rates: (mode, ranks) -> samples/s per repeat)."""
    cfg = TrainConfig(data=DATASET["path"], out=str(root), hidden=(8,), batch_size=30,
                      lr=0.01, epochs=1)
    points = scaling.plan(cfg, modes, ranks, repeats, scaling_given=False)
    manifest = scaling.Sweep(str(root), cfg, points, "mpiexec -n {n}", False).manifest(
        DATASET, {p.name: {"state": "done"} for p in points})
    (root / "calibration").mkdir(parents=True)
    (root / "sweep.json").write_text(json.dumps(manifest))
    if comm is not None:
        (root / "calibration" / "comm.json").write_text(json.dumps(comm))
        for n in ranks:
            (root / "calibration" / f"step-p{n}.json").write_text(json.dumps(bench_step(n)))
    for p in points:
        names = [f"h{i}" for i in range(hosts if p.ranks > 1 else 1)]
        if comm is not None:
            predicted = costmodel.predict_step(bench_step(p.ranks), comm, p.batch_size,
                                               p.ranks, len(names), p.ranks // len(names),
                                               N_BYTES)["step_s"]
            step = predicted / (1 + (errors or {}).get((p.mode, p.ranks), 0.0))
        else:
            step = p.batch_size / (rates or {}).get((p.mode, p.ranks), [1000.0] * repeats
                                                    )[p.repeat]
        phases = {ph: {"mean": step / 5, "max": step / 5} for ph in PHASES}
        summary = {"ranks": p.ranks, "hosts": names, "oversubscribed": False,
                   "ranks_per_host": [p.ranks // len(names)] * len(names), "mpi": "MPICH 5",
                   "steps": steps, "steps_this_run": steps, "resumed_from_step": None,
                   "batch_size": p.batch_size, "params": 140, "lr": p.lr, "sync": "blocking",
                   "samples_per_s": p.batch_size / step, "step_s": {"mean": step, "max": step},
                   "step_time_s": phases, "allreduce_bytes_per_step": N_BYTES}
        (root / p.name).mkdir(parents=True)
        (root / p.name / "summary.json").write_text(json.dumps(summary))
    return root


@pytest.fixture
def report_of(cli, tmp_path, monkeypatch):
    """`mpinn scaling report SWEEP` in this process, without the plots (seconds each):
    (report.md, what the console showed)."""
    def no_pyplot(what: str):
        raise UsageError("no plots in this test")
    monkeypatch.setattr(report, "load_pyplot", no_pyplot)

    def make(sweep_dir: Path) -> tuple[str, str]:
        result = ok(cli("scaling", "report", sweep_dir, "--out", tmp_path / "report"))
        return (tmp_path / "report" / "report.md").read_text(), result.stdout
    return make


@pytest.mark.fast
def test_a_point_run_once_shows_no_spread_and_the_report_says_so(report_of, tmp_path):
    text, console = report_of(written_sweep(tmp_path / "once", rates={
        ("strong", 1): [35667.0], ("strong", 2): [50000.0]}))
    assert "| 1 | 1 | 1 | 30 | 35,667 | 1 |" in text and "35,667 (35,667-35,667)" not in text
    for where in (text, console):
        assert "1 repeat" in where and "every point ran once" in where
        assert "--repeats 3" in where
    assert "mpinn scaling: warning: 1 repeat: every point ran once" in console
    text, console = report_of(written_sweep(tmp_path / "twice", repeats=2, rates={
        ("strong", 1): [100.0, 120.0], ("strong", 2): [150.0, 170.0]}))
    assert "| 110 (100-120) |" in text and "160 (150-170)" in text
    assert "1 repeat" not in text and "warning" not in console


@pytest.mark.fast
def test_points_with_few_timed_steps_are_named(report_of, tmp_path):
    """A run's first step is a warm-up: FEW_STEPS + 1 steps time FEW_STEPS, enough."""
    enough = scaling.FEW_STEPS + 1
    text, console = report_of(written_sweep(tmp_path / "enough", repeats=2, steps=enough))
    assert "few timed steps" not in text and "warning" not in console
    assert f"| {enough - 1} |" in text  # the run table's steps timed
    text, console = report_of(written_sweep(tmp_path / "few", repeats=2, steps=enough - 1))
    for where in (text, console):
        assert f"strong, 1 rank ({enough - 2}); strong, 2 ranks ({enough - 2})" in where
        assert f"fewer than {scaling.FEW_STEPS} steps timed" in where and "--epochs" in where
    assert "mpinn scaling: warning: few timed steps: strong, 1 rank" in console


@pytest.mark.fast
def test_predictions_off_by_more_than_15_percent_are_named(report_of, tmp_path):
    sweep_dir = written_sweep(tmp_path / "s", repeats=2, comm=ONE_HOST_COMM,
                              errors={("strong", 1): 0.149, ("strong", 2): 0.284})
    text, console = report_of(sweep_dir)
    rows = {int(r["ranks"]): r for r in read_points(tmp_path / "report")}
    assert float(rows[2]["prediction_error"]) == pytest.approx(0.284, rel=1e-9)
    for where in (text, console):
        assert "strong, 2 ranks (+28.4%" in where and "more than 15%" in where
        assert "strong, 1 rank (" not in where  # 14.9%: within the target
    assert "mpinn scaling: warning: prediction error: strong, 2 ranks (+28.4%" in console
    assert "largest |error| 28.4%, above the 15% the model aims for" in text


@pytest.mark.fast
def test_a_projection_from_one_host_says_no_network_was_measured(report_of, tmp_path):
    text, console = report_of(written_sweep(tmp_path / "s", repeats=2, comm=ONE_HOST_COMM))
    projection = text[text.index("## Projection"):text.index("## Every run")]
    assert "**Links: shared memory only: no network was measured.**" in projection
    assert "- network: none measured (bench comm on one host)" in projection
    # the exchange fit of bench comm's shm pair, as the cost model takes it
    assert ("- shared memory: alpha 5 us, beta 300 ps/B, from bench comm's shm link (ranks 0 "
            "and 1)") in projection
    assert "| weak |" not in projection and "| strong | 16 |" in projection
    assert "mpinn scaling: warning: projection: shared memory only" in console


@pytest.mark.fast
def test_a_projection_across_hosts_names_the_network_it_measured(report_of, tmp_path):
    text, console = report_of(written_sweep(tmp_path / "s", repeats=2, hosts=2,
                                            comm=TWO_HOST_COMM))
    projection = text[text.index("## Projection"):text.index("## Every run")]
    assert ("**Links: network from bench comm's net link (ranks 0 and 1, across hosts a, "
            "b).**") in projection
    assert "- network: alpha 25 us, beta 800 ps/B, from bench comm's net link" in projection
    assert "- shared memory: none measured (one rank per host)" in projection
    assert "shared memory only" not in text and "warning" not in console


@pytest.mark.fast
def test_weak_points_show_the_learning_rate_they_trained_with(report_of, tmp_path):
    text, _ = report_of(written_sweep(tmp_path / "both", ranks=(1, 2, 4),
                                      modes=("strong", "weak"), repeats=2))
    assert ("**optimizer**: momentum, lr: strong 0.01; weak 0.01 at 1, 0.02 at 2, 0.04 at 4 "
            "ranks (linear scaling: 0.01 x global batch / 30), momentum 0.9") in text
    assert "| weak | 4 | 0 | `" in text and "| 120 | 0.04 |" in text  # the run table
    text, _ = report_of(written_sweep(tmp_path / "strong", repeats=2))
    assert "**optimizer**: momentum, lr 0.01, momentum 0.9" in text


@pytest.mark.fast
def test_the_throughput_plot_draws_no_spread_for_a_point_run_once():
    try:
        import matplotlib
    except ImportError:  # fails under CI=true: the plot extra is part of make install
        unavailable("matplotlib", "pip install 'mpinn[plot]'")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from mpinn.perf.plot import draw_throughput
    rows = report.points([fake_run("strong", 1, 100.0), fake_run("strong", 2, 150.0),
                          fake_run("strong", 2, 170.0, 1)])
    ax = Figure().subplots()
    draw_throughput(ax, rows)
    low, high = ax.containers[0].lines[1]  # the caps of the error bars
    assert math.isnan(low.get_ydata()[0]) and math.isnan(high.get_ydata()[0])
    assert (low.get_ydata()[1], high.get_ydata()[1]) == (150.0, 170.0)


@pytest.mark.fast
def test_the_driver_counts_timed_steps_as_the_report_does(tmp_path, capfd):
    """20 steps per point time 19 (the first is a warm-up): fewer than FEW_STEPS."""
    cfg = TrainConfig(data="d.h5", out=str(tmp_path), hidden=(8,), batch_size=30,
                      epochs=1)
    study = scaling.Sweep(str(tmp_path), cfg, scaling.plan(cfg, ("strong",), (1,), 1, False),
                          "mpiexec -n {n}", False)
    scaling.check_steps(study, DATASET)  # 600 rows / 30 = 20 steps
    assert "some points time 19 steps only" in capfd.readouterr().out
    scaling.check_steps(study, dict(DATASET, train_rows=630))
    assert capfd.readouterr().out == ""
