"""A trace's timeline as a PNG (`mpinn plot --trace run.json`): for a few steps of the
run, one band per rank with a row per kind of work: the step's phases, the gradient
buckets' Allreduces (in flight from start to completion), the read-ahead's reads.
Perfetto shows the whole file; this is the picture for a report. Serial, no MPI."""

from __future__ import annotations

import json
import os

from mpinn.base.errors import UsageError
from mpinn.base.files import check_writable, read_bytes
from mpinn.perf.plot import load_pyplot, save_figure

COLORS = {"data": "#bbbbbb", "forward": "#4c72b0", "backward": "#55a868",
          "allreduce": "#c44e52", "update": "#8172b2", "allgather": "#937860"}
ROWS = ("phases", "buckets", "read-ahead")


def read_trace(path: str) -> list[dict]:
    try:
        events = json.loads(read_bytes(path, "trace").decode())["traceEvents"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path}: not an mpinn trace ({exc})") from None
    spans = [e for e in events if e.get("ph") == "X"]
    if not any(e["name"].startswith("step ") for e in spans):
        raise UsageError(f"{path}: the trace holds no steps")
    return spans


def window(spans: list[dict], steps: int) -> tuple[float, float]:
    """The time span of rank 0's last `steps` steps (microseconds)."""
    mine = sorted((e for e in spans if e["pid"] == 0 and e["name"].startswith("step ")),
                  key=lambda e: e["ts"])[-steps:]
    return mine[0]["ts"], mine[-1]["ts"] + mine[-1]["dur"]


def row_of(event: dict) -> str | None:
    if event["name"] in COLORS:
        return "phases"
    if event["name"].startswith("Allreduce"):
        return "buckets"
    return "read-ahead" if event["name"].startswith("read step") else None


def bars(spans: list[dict], rank: int, row: str, lo: float, hi: float
         ) -> list[tuple[dict, float, float]]:
    """(event, start, length) in ms from lo of rank's events of `row` that overlap
    [lo, hi], clipped to it (another rank's step may begin before rank 0's)."""
    out = []
    for e in spans:
        start, end = max(e["ts"], lo), min(e["ts"] + e["dur"], hi)
        inside = start < end or (e["dur"] == 0 and lo <= e["ts"] <= hi)  # (an instant)
        if e["pid"] == rank and row_of(e) == row and inside:
            out.append((e, (start - lo) / 1e3, (end - start) / 1e3))
    return out


def plot_trace(trace: str, out: str, steps: int = 3) -> str:
    """Write the last `steps` steps of the trace as a timeline to out; returns out."""
    spans = read_trace(trace)
    check_writable(out)
    lo, hi = window(spans, steps)
    ranks = sorted({e["pid"] for e in spans})
    plt = load_pyplot("mpinn plot --trace")
    fig, ax = plt.subplots(figsize=(11, 0.9 + 0.75 * len(ranks) * len(ROWS)))
    labels = []
    for rank in reversed(ranks):
        for row in reversed(ROWS):
            y = len(labels)
            labels.append(f"rank {rank}: {row}")
            for e, start, length in bars(spans, rank, row, lo, hi):
                ax.barh(y, length, left=start, height=0.7,
                        color=COLORS.get(e["name"], "#dd8452"), alpha=0.55 if
                        row == "buckets" else 1.0, edgecolor="black", linewidth=0.3)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("ms")
    ax.set_title(f"{os.path.basename(trace)}: the last {steps} steps, {len(ranks)} ranks")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    ax.legend(handles + [plt.Rectangle((0, 0), 1, 1, color="#dd8452")],
              [*COLORS, "bucket Allreduce"], ncol=7, loc="upper center",
              bbox_to_anchor=(0.5, -0.12 - 0.1 / len(ranks)), fontsize="small")
    return save_figure(plt, fig, out)
