"""--trace: a timeline in Chrome's trace-event JSON, one process per rank."""

from __future__ import annotations

import json
import os
import signal

import pytest

from conftest import expect_error, finish, mpinn, ok, start_mpinn, wait_for
from mpinn.perf import timeline


def nest_without_overlap(events: list[dict]) -> bool:
    """Within one thread: every two events are disjoint, or one holds the other."""
    stack: list[float] = []  # ends of the open events
    for e in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
        while stack and e["ts"] >= stack[-1] - 1e-3:
            stack.pop()
        if stack and e["ts"] + e["dur"] > stack[-1] + 1e-3:
            return False
        stack.append(e["ts"] + e["dur"])
    return True


@pytest.mark.parametrize("n", [1, 2])
def test_the_trace_is_a_timeline_of_every_rank(n, synth, tmp_path):
    trace = tmp_path / "trace.json"
    ok(mpinn(n, "train", synth, "--out", tmp_path / "run", "--epochs", 2, "--batch-size", 30,
             "--bucket-mb", "0.01", "--trace", trace, "--trace-steps", 3))
    events = json.loads(trace.read_text())["traceEvents"]
    processes = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert sorted(processes) == list(range(n))
    assert all(name.startswith(f"rank {pid} (") for pid, name in processes.items())
    for pid in range(n):
        threads = {e["tid"]: e["args"]["name"] for e in events
                   if e["name"] == "thread_name" and e["pid"] == pid}
        assert {"step", "read-ahead", "checkpoint", "bucket 1"} <= set(threads.values())
        spans = [e for e in events if e["ph"] == "X" and e["pid"] == pid]
        steps = [e["name"] for e in spans if e["name"].startswith("step ")]
        assert steps == ["step 1", "step 2", "step 3", "step 38", "step 39", "step 40"]
        for tid in threads:
            assert nest_without_overlap([e for e in spans if e["tid"] == tid]), (pid, tid)
        names = {e["name"] for e in spans}
        assert {"forward", "backward", "allreduce", "update", "checkpoint"} <= names
        assert any(name.startswith("Allreduce ") for name in names)
        assert any(name.startswith("read step ") for name in names)
    drawn = ok(mpinn(None, "plot", "--trace", trace, "--steps", 2))  # beside it, as a PNG
    assert (tmp_path / "trace.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", drawn.stdout


def test_a_trace_in_a_missing_directory_is_refused_first(synth, tmp_path):
    expect_error(mpinn(2, "train", synth, "--out", tmp_path / "run", "--trace",
                       tmp_path / "no" / "t.json"), 2, "does not exist")
    assert not (tmp_path / "run").exists()


def test_plot_takes_a_run_or_a_trace(tmp_path):
    expect_error(mpinn(None, "plot"), 2, "--trace TRACE.json (one of them)")
    (tmp_path / "t.json").write_text("{}")
    expect_error(mpinn(None, "plot", "--trace", tmp_path / "t.json"), 2, "not an mpinn trace")


def test_a_stop_writes_the_trace(synth, tmp_path):
    """Ctrl-C: the ranks agree on the stop, checkpoint, and rank 0 writes the trace."""
    out, trace = tmp_path / "run", tmp_path / "trace.json"
    proc = start_mpinn(2, "train", synth, "--out", out, "--epochs", 100000, "--hidden", "8",
                       "--batch-size", 8, "--trace", trace, "--trace-steps", 5)
    wait_for(lambda: (out / "metrics.jsonl").exists(), proc)
    os.killpg(proc.pid, signal.SIGINT)
    expect_error(finish(proc, timeout=60), 3, "stopped by a signal")
    events = json.loads(trace.read_text())["traceEvents"]
    steps = [e for e in events if e["ph"] == "X" and e["name"].startswith("step ")]
    assert {e["pid"] for e in steps} == {0, 1} and len(steps) == 2 * 10  # first 5, last 5
    assert any(e["name"] == "checkpoint" for e in events if e["ph"] == "X")


@pytest.mark.fast
def test_the_picture_keeps_what_overlaps_its_window():
    """The window is rank 0's last steps; rank 1's forward that began 5 us before it is
    drawn clipped, not left out; what ends before it or begins after it is not drawn."""
    span = lambda pid, name, ts, dur: {"pid": pid, "name": name, "ts": ts, "dur": dur}  # noqa: E731
    spans = [span(0, "step 1", 0, 100), span(0, "step 2", 100, 100),
             span(0, "forward", 100, 40), span(1, "forward", 95, 45),
             span(1, "backward", 10, 50), span(1, "Allreduce 1.00 MB", 190, 30)]
    lo, hi = timeline.window(spans, 1)
    assert (lo, hi) == (100, 200)
    drawn = timeline.bars(spans, 1, "phases", lo, hi)
    assert [(e["name"], start, length) for e, start, length in drawn] == [
        ("forward", 0.0, 0.04)]
    assert [(start, length) for _, start, length in timeline.bars(spans, 1, "buckets", lo, hi)
            ] == [(0.09, pytest.approx(0.01))]
